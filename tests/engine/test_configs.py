from dataclasses import dataclass

import pytest

from engine.configs import ConfigError, make_config, parse_overrides


@dataclass
class Cfg:
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    limit: int | None = None


def test_overrides_parse_to_field_types():
    got = parse_overrides(
        Cfg, ["steps=5", "lr=0.5", "flag=true", "name=abc", "sizes=3,4", "limit=none"]
    )
    assert got == {
        "steps": 5,
        "lr": 0.5,
        "flag": True,
        "name": "abc",
        "sizes": (3, 4),
        "limit": None,
    }


@pytest.mark.parametrize(
    "pair, message",
    [
        ("nokey=1", "unknown config key 'nokey'"),
        ("steps=abc", "expected int"),
        ("flag=maybe", "expected bool"),
        ("steps", "key=value"),
    ],
)
def test_bad_overrides_say_what_is_wrong(pair, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(Cfg, [pair])


def test_make_config_rejects_unknown_keys_and_turns_lists_into_tuples():
    assert make_config(Cfg, {"sizes": [5]}).sizes == (5,)
    with pytest.raises(ConfigError, match="unknown"):
        make_config(Cfg, {"bogus": 1})
