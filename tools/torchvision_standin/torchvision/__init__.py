"""A stand-in for torchvision, whose builds on the package index do not load
beside CPU torch 2.13 ("operator torchvision::nms does not exist").
SGLang and transformers import it (and its submodules) at start-up but a
text model never calls it: every name is a placeholder that fails if used."""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0"


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class _Missing(metaclass=_Meta):
    def __init__(self, *a, **k):
        raise RuntimeError("torchvision is a stand-in here: no image processing")

    def __class_getitem__(cls, item):
        return cls


def _attr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing


__getattr__ = _attr


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _attr
        return mod

    def exec_module(self, module):
        return None


sys.meta_path.insert(0, _Finder())
