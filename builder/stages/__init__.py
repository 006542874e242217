"""Build stages, one module each, put in order by builder.build.STAGES."""
