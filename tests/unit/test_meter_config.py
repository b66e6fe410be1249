"""``[[meters]]`` in the configuration file: what an installer writes, and what is refused in words."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, load_settings

SITE = """
[site.grid]
max_current_amperes = 100

[[site.circuits]]
circuit_id = "north"
max_current_amperes = 40

[[site.circuits]]
circuit_id = "unlimited"
"""


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "ocpp-lc.toml"
    path.write_text(SITE + text, encoding="utf-8")
    return load_settings(path)


def test_a_sunspec_and_a_mapped_meter(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        """
[[meters]]
name = "grid-main"
host = "192.0.2.50"

[[meters]]
name = "north"
host = "192.0.2.51"
unit_id = 2
node = "north"
poll_interval_s = 2
[meters.registers]
data_type = "int32"
word_order = "little"
current_l1 = 10
current_l2 = 12
current_l3 = 14
current_scale = 0.001
""",
    )
    first, second = settings.meters  # type: ignore[attr-defined]
    assert (first.node, first.port, first.unit_id, first.registers) == ("grid", 502, 1, None)
    assert second.node == "north" and second.poll_interval_s == 2.0
    assert second.registers.reads() == [(10, 6)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('node = "south"', "[meters.0] node: 'south' is neither 'grid' nor a circuit_id"),
        ('node = "unlimited"', "'unlimited' has no max_current_amperes: a meter needs a limit to subtract from"),
        ("poll_interval_s = 10\nstale_after_s = 5", "stale_after_s must be at least poll_interval_s"),
        ("safety_margin_amperes = -1", "safety_margin_amperes"),
    ],
)
def test_meters_that_do_not_fit_are_refused_in_words(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'[[meters]]\nname = "m"\nhost = "192.0.2.50"\n{text}\n')
    assert message in str(caught.value)


def test_two_meters_on_one_node_are_refused(tmp_path: Path) -> None:
    meter = '[[meters]]\nname = "{}"\nhost = "192.0.2.50"\n'
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, meter.format("a") + meter.format("b"))
    assert "'grid' already has a meter" in str(caught.value)


def test_the_readme_meter_examples_load(tmp_path: Path) -> None:
    """The installer's SunSpec and register-map examples in README.md, as written, with the circuit they name."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Site meters (Modbus TCP)", 1)[1].split("\n### ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```toml\n")[1:]]
    assert len(blocks) == 2
    circuit = '\n[[site.circuits]]\ncircuit_id = "carpark-north"\nmax_current_amperes = 125\n'
    path = tmp_path / "ocpp-lc.toml"
    path.write_text(blocks[0] + circuit + blocks[1], encoding="utf-8")
    settings = load_settings(path)
    assert [(meter.name, meter.node) for meter in settings.meters] == [
        ("grid-main", "grid"),
        ("feeder-north", "carpark-north"),
    ]
    assert settings.site.other_load_amperes == 120
    registers = settings.meters[1].registers
    assert registers is not None and registers.reads() == [(6, 6), (52, 2)]
