"""``augment``'s dtype errors name the dtype's kind: complex, boolean and integer inputs each get their own
message and fix (complex input was called an "integer dtype")."""

from __future__ import annotations

import pytest
import torch

import diffaug_fast as df


@pytest.fixture(scope="module")
def tiny():
    return df.Denoiser(df.UNet(df.get_preset("adm-tiny")))


@pytest.mark.parametrize(
    "dtype,kind,fix",
    [
        (torch.complex64, "complex", "x.real"),
        (torch.complex128, "complex", "x.real"),
        (torch.bool, "boolean", "x.float() * 2 - 1"),
        (torch.int32, "integer", "x.float() / 127.5 - 1"),
        (torch.uint8, "integer", "x.float() / 127.5 - 1"),  # uint8 NCHW; NHWC uint8 is accepted as pixels
    ],
)
def test_non_real_float_input_is_named_by_kind(tiny, dtype, kind, fix):
    x = torch.zeros(1, 3, 32, 32, dtype=dtype)
    with pytest.raises(TypeError) as e:
        df.augment(x, tiny, t=10)
    msg = str(e.value)
    assert msg.startswith(f"x has {kind} dtype {dtype};") and fix in msg and "\n" not in msg
    assert dtype.is_complex == ("integer" not in msg and "complex" in msg)
