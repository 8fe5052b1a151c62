"""flowdsl — a declarative workflow language with automatic saga compensation."""
