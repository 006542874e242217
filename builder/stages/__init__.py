"""Build stages: each a small unit with a clear input and output, read in order by
:func:`builder.build.build_image`."""
