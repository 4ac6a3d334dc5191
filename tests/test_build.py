"""A user's install may lack a compiler and degrade to the pure-torch paths (setup.py says so
loudly); CI must not: there the kernel tests would otherwise skip themselves silently."""
import os

import pytest


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI insists on the native build")
def test_native_extension_and_emulated_avx512_built_in_ci():
    import bitpress._C  # noqa: F401
    from bitpress.kernels import cpu

    isas = cpu.available_isas()
    assert "scalar" in isas
    if "avx2" in isas:  # SIMDe (simde-py) is a build requirement: the emulated build exists
        assert "avx512-emu" in isas, isas
