import pytest

from almanac.imports import import_object, resolve
from almanac.retry import parse_retry_after


def test_both_spellings_name_the_same_object():
    assert import_object("almanac.retry:parse_retry_after") is parse_retry_after
    assert import_object("almanac.retry.parse_retry_after") is parse_retry_after


def test_resolve_passes_objects_through():
    assert resolve(parse_retry_after) is parse_retry_after
    assert resolve("almanac.retry:parse_retry_after") is parse_retry_after


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("almanac.retry:nothing_here", AttributeError),
        ("almanac.no_such_module:x", ImportError),
        ("plainword", ValueError),
        (":x", ValueError),
        ("almanac.retry:", ValueError),
    ],
)
def test_a_bad_path_raises_what_import_would(path, error):
    with pytest.raises(error):
        import_object(path)
