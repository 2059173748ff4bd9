"""TPU slices described for the TPU compiler (`jax.experimental.topologies`): their chips,
HBM per chip and topology names; no TPU is needed to compile for one."""

from __future__ import annotations

from typing import Any

GIB = 1024**3
CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# chips -> topology of a slice (`jax.experimental.topologies` names); v4 and v5p chips are
# one megacore device each, and their slices are named by TensorCores (v4-32: 16 chips)
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}
TOPOLOGIES = {"v4": _TOPOLOGY_3D, "v5e": _TOPOLOGY_2D, "v5p": _TOPOLOGY_3D, "v6e": _TOPOLOGY_2D}
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}


def slice_name(chip: str, chips: int) -> str:
    """ "v5e", 16 -> "v5e-16"; "v4", 16 -> "v4-32" (v4 and v5p count TensorCores)."""
    return f"{chip}-{chips * CORES_PER_CHIP[chip]}"


def parse_slice(name: str) -> tuple[str, int]:
    """ "v5e-16" -> ("v5e", 16 chips); "v4-32" -> ("v4", 16 chips)."""
    chip, _, cores = name.partition("-")
    if chip not in CORES_PER_CHIP or not cores.isdigit():
        raise ValueError(f"slice {name!r} is not <chip>-<cores> with chip in {sorted(TOPOLOGIES)}")
    return chip, int(cores) // CORES_PER_CHIP[chip]


def tpu_devices(chip: str, chips: int) -> list[Any]:
    """Described (not attached) TPU devices of a slice: the TPU compiler can compile for
    them without a TPU (needs libtpu: `pip install 'jax[tpu]'`)."""
    from jax.experimental import topologies  # loads libtpu: only when a TPU is described

    if chips not in TOPOLOGIES[chip]:
        raise ValueError(f"no {chip} topology of {chips} chips; known: {sorted(TOPOLOGIES[chip])}")
    kwargs = {"chip_config_name": "megacore"} if CORES_PER_CHIP[chip] == 2 else {}
    name = f"{chip}:{TOPOLOGIES[chip][chips]}"
    return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
