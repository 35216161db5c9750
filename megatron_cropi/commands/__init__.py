"""The bodies of the ``cropi`` subcommands, one module each; ``megatron_cropi.cli`` parses and dispatches.

Each body loads the run config, builds what it needs through :mod:`megatron_cropi.wiring`, and
returns an exit status; errors a user can fix end the command with exit status 2 and the message on
stderr (printed by :func:`megatron_cropi.cli.main`, or by the command where it names more errors).
"""
