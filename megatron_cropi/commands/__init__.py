"""The bodies of the ``cropi`` subcommands, one module each; ``megatron_cropi.cli`` parses and dispatches.

Each body loads the run config, builds what it needs through :mod:`megatron_cropi.wiring`, and
returns an exit status; errors a user can fix propagate as the package's input errors and
:func:`megatron_cropi.cli.main` prints them with exit status 2.
"""
