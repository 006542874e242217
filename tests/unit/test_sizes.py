import pytest

from builder.recipe.sizes import SizeError, format_size, parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("8G", 8 << 30), ("100K", 100 << 10),
    ("1T", 1 << 40), ("4096", 4096), (4096, 4096), ("10B", 10), ("3gib", 3 << 30),
])
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "hint"), [
    ("2 GB", "2GiB"), ("4GB", "4GiB"), ("1.5G", "2GiB"), ("big", "2GiB"), ("", "2GiB"),
])
def test_bad_sizes_hint(text: str, hint: str) -> None:
    with pytest.raises(SizeError, match=f"try {hint}"):
        parse_size(text)


@pytest.mark.parametrize("value", [0, -1, True, None, 1.5, [1]])
def test_rejects_non_sizes(value: object) -> None:
    with pytest.raises(SizeError):
        parse_size(value)


def test_format_size_round_trips() -> None:
    for size in (1, 1024, 3 << 20, 5 << 30, (1 << 30) + 1):
        assert parse_size(format_size(size)) == size
