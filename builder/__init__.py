"""amiforge: build Amazon Machine Images from YAML recipes."""

__version__ = "0.1.0"
