"""The subcommands of `build`, one module per kind; builder.cli dispatches to them."""
