"""``python -m flowdsl``: the ``flowdsl`` command, for environments where its script is not on PATH."""

from flowdsl.launch import main

main()
