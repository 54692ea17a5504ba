import os
import sys

# The project is a set of flat scripts (as MAE): make the repository root importable however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from util.misc import print_library_notes  # noqa: E402

# The scripts print the encoder package's load notes (init_distributed routes them); tests that call the library in
# the process read them from stdout the same way.
print_library_notes()

# Ops that make a CUDA host wait for the device: a value read back (item, bool, tolist, printing) or an output
# whose shape depends on the data (boolean indexing, nonzero, unique, masked_select).
_HOST_READ_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique",
                  "repeat_interleave", "equal", "allclose")


# Tensor methods that read values back without dispatching an op of their own on a CPU tensor.
_HOST_READ_METHODS = ("tolist", "numpy")


class HostReadRecorder(TorchDispatchMode):
    """Records the ops above, and the methods that read a whole tensor back, by `iteration` (set by the test). The
    optimizer's `step` counters are exempt: torch keeps them on the host (non-capturable AdamW), so reading them
    costs no device sync."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer, self.iteration, self.seen = optimizer, -1, []
        self._methods = _MethodRecorder(self)

    def _host_counter(self, tensor):
        return any(tensor is state.get("step") for state in self.optimizer.state.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if (name in _HOST_READ_OPS or name.startswith("_unique")) and not (args and self._host_counter(args[0])):
            self.seen.append((self.iteration, name))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc_info):
        super().__exit__(*exc_info)
        self._methods.__exit__(*exc_info)


class _MethodRecorder(TorchFunctionMode):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READ_METHODS and not (args and self.recorder._host_counter(args[0])):
            self.recorder.seen.append((self.recorder.iteration, name))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_read_recorder():
    """HostReadRecorder, to be built on the run's optimizer and entered around the steps."""
    return HostReadRecorder



@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """make(name, splits, classes=("a", "b"), size=(72, 80), seed=0) -> a new tiny ImageFolder
    (helpers.write_image_folder)."""
    from helpers import write_image_folder

    def make(name, splits, **kwargs):
        return write_image_folder(tmp_path_factory.mktemp(name), splits, **kwargs)
    return make
