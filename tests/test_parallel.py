from lsdc.parallel import parallel_map


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError("bad item 3")
    return x * x


def test_serial_and_parallel_agree_and_failures_are_isolated():
    for workers in (1, 2):
        outs = list(parallel_map(_square_or_fail, range(7), workers=workers, progress=False))
        assert sorted(o.item for o in outs) == list(range(7))
        ok = {o.item: o.result for o in outs if o.ok}
        assert ok == {i: i * i for i in range(7) if i != 3}
        (bad,) = [o for o in outs if not o.ok]
        assert bad.item == 3 and bad.error == "ValueError: bad item 3"


def test_empty_input():
    assert list(parallel_map(_square_or_fail, [], workers=2, progress=False)) == []
