"""The build pipeline's machinery: declared stages, their runner, and the trees they
share. The stages themselves are in :mod:`builder.stages`; their order in
:mod:`builder.build`."""
