"""Runnable flowdsl examples: each sub-package holds a flow, its worker module and inputs."""
