"""The per-sample work of scripts/bench_rivals.py, and the MosaicML streaming and litdata
datasets that do it, in a module the loader workers import by name. Neither library is
imported until one of its classes is asked for: importing them into the toolkit's processes
slowed its epoch by seconds."""

_DECODE = []


def decoder():  # noqa: ANN201 - a train.decode.TrainDecoder
    """The per-sample work of every contender, done in its loader workers."""
    from train.decode import TrainDecoder

    return TrainDecoder(160, 0.35, True, seed=0)


def decode(sample: dict) -> tuple:
    if not _DECODE:
        _DECODE.append(decoder())
    return _DECODE[0](sample)


def __getattr__(name: str) -> type:
    """MosaicDecoded and LitDecoded, made on first use (by name, as unpickling asks): the
    toolkit's processes import this module for `decoder` without importing either library."""
    if name == "MosaicDecoded":
        import streaming

        class MosaicDecoded(streaming.StreamingDataset):
            def __getitem__(self, i: int) -> tuple:
                return decode(super().__getitem__(i))

        made = MosaicDecoded
    elif name == "LitDecoded":
        import litdata

        class LitDecoded(litdata.StreamingDataset):
            def __getitem__(self, i: object) -> tuple:
                return decode(super().__getitem__(i))

        made = LitDecoded
    else:
        raise AttributeError(name)
    made.__qualname__ = name
    globals()[name] = made
    return made
