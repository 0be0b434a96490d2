"""Sub-commands of the ``pktjax`` command line, one module per command group."""
