"""Test helper: the first lines of a script run in a subprocess where torch cannot be imported (as on a
device where it is not installed), whatever this environment has."""

BLOCK_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")

sys.meta_path.insert(0, NoTorch())
try:
    import torch  # noqa: F401
    sys.exit("torch was importable")
except ImportError:
    pass
"""
