"""kpnb.core.files' atomic writes and kpnb.core.images' uint8 check, which every writer and model shares."""
import hashlib
import os

import numpy as np
import pytest
import torch

from kpnb.core import files
from kpnb.core.images import check_uint8_images


def test_atomic_path_renames_on_success_and_removes_the_temporary_on_error(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    with files.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".a.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"one")
        assert not target.exists()  # nothing there until the block ends
    assert target.read_bytes() == b"one" and sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]
    with pytest.raises(RuntimeError, match="killed"):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"one" and sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def test_atomic_path_with_a_named_temporary_keeps_the_callers_file_mode(tmp_path):
    target, tmp = tmp_path / "b.tar", tmp_path / "b.tar.tmp"
    with files.atomic_path(target, tmp) as got:
        assert got == tmp
        with open(got, "wb") as f:  # made by the caller, as open() makes it (not mkstemp's owner-only mode)
            f.write(b"tar")
    assert target.read_bytes() == b"tar" and not tmp.exists()
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fsync_dir_and_file_and_file_sha1(tmp_path):
    data = os.urandom(3 << 19)  # a MiB and a half: read in two blocks
    (tmp_path / "f").write_bytes(data)
    assert files.file_sha1(tmp_path / "f") == hashlib.sha1(data).hexdigest()
    files.fsync_file(tmp_path / "f")
    files.fsync_dir(tmp_path)
    files.fsync_dir(tmp_path / "nowhere")  # a folder that cannot be opened: nothing to flush, no error


def test_check_uint8_images_names_the_argument_and_what_was_found(tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.uint8, shape=(2, 4, 4, 3))
    got = check_uint8_images(mm)
    assert np.shares_memory(got, mm) and got.shape == (2, 4, 4, 3)  # no copy: a memory map stays on disk
    assert check_uint8_images(np.zeros((4, 4, 3), np.uint8), single=True).shape == (1, 4, 4, 3)
    assert check_uint8_images(torch.zeros(1, 4, 4, 3, dtype=torch.uint8)).dtype == np.uint8
    with pytest.raises(ValueError, match=r"samples: expected uint8 images \[N, H, W, 3\], got a ndarray of float32 "
                                         r"\[2, 4, 4, 3\]"):
        check_uint8_images(np.zeros((2, 4, 4, 3), np.float32), "samples")
    with pytest.raises(ValueError, match=r"images: .* uint8 \[4, 4, 3\]"):
        check_uint8_images(np.zeros((4, 4, 3), np.uint8))  # one image only where single=True
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\] or \[H, W, 3\], got a Tensor of uint8 \[1, 3, 4, 4\]"):
        check_uint8_images(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), single=True)
    with pytest.raises(ValueError, match="got a list that is not an array"):
        check_uint8_images([np.zeros((2, 2, 3)), np.zeros(3)])
