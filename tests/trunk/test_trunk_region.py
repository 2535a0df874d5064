import pytest

from meshci.trunk import Region


def test_region_basics():
    r = Region(2, 5, 1, 7)
    assert (r.height, r.width, r.area) == (3, 6, 18)
    assert Region.from_list(r.to_list()) == r
    assert Region.full(4, 3) == Region(0, 4, 0, 3)
    assert r.contains(Region(3, 5, 1, 2)) and not r.contains(Region(1, 5, 1, 2))
    assert r.intersect(Region(4, 9, 0, 2)) == Region(4, 5, 1, 2)
    assert r.intersect(Region(5, 9, 0, 9)) is None  # touching edges share no cell
    assert r.union(Region(0, 1, 8, 9)) == Region(0, 5, 1, 9)
    assert r.shift(-2, -1) == Region(0, 3, 0, 6)


def test_region_is_frozen_hashable_and_ordered():
    a, b = Region(0, 1, 0, 1), Region(0, 2, 0, 1)
    assert sorted([b, a]) == [a, b]
    assert len({a, Region(0, 1, 0, 1)}) == 1
    with pytest.raises(AttributeError):
        a.r0 = 3  # type: ignore[misc]


def test_region_rejects_negative_extent_and_bad_lists():
    with pytest.raises(ValueError):
        Region(3, 2, 0, 1)
    with pytest.raises(ValueError):
        Region.from_list([0, 1, 2])
