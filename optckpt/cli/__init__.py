"""The ``optckpt`` command line: a thin shell over the library; only this package prints."""
