"""Import-time stand-in for the CPU build of `sgl-kernel`, which has no PyPI wheel (docs/sglang_cpu_lane.md).

On a CPU without Intel AMX, SGLang's CPU path runs torch-native layers and never calls these ops; any call
raises, so an op that a future SGLang starts to need cannot go unnoticed. Put this folder on PYTHONPATH only
for the SGLang CPU contract lane.
"""

__version__ = "0.0.0-stub"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel stub: op {name!r} was called (the CPU contract lane cannot run it)")

    _missing.__name__ = name
    return _missing
