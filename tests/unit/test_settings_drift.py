"""One source of truth for settings: every `Settings` field's env name and default, held against
the README's configuration table, the Helm chart's values (through its ConfigMap) and the
docker-compose environment. A default changed in one place only fails here, naming both values.

Deliberate differences (a cluster is not a laptop) are listed once, with the reason."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "classify-worker"

#: env name → why the chart's value differs from the code's default.
CHART_DIFFERS = {
    "CW_KAFKA__BOOTSTRAP_SERVERS": "an in-cluster service name, not localhost",
    "CW_TOPICS__REPLICATION": "a production cluster has three or more brokers",
}
#: env name → why docker-compose's value differs from the code's default.
COMPOSE_DIFFERS = {
    "CW_KAFKA__BOOTSTRAP_SERVERS": "the compose network's broker",
    "CW_TOPICS__PARTITIONS": "two workers on a laptop",
}
#: Defaults that are not constants: the README names them in words.
DYNAMIC = {"CW_KAFKA__INSTANCE_ID": "hostname"}


def _defaults(model: type[BaseModel], prefix: str = "CW_") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(_defaults(annotation, env + "__"))
        elif env in DYNAMIC:
            out[env] = DYNAMIC[env]
        else:
            out[env] = field.get_default(call_default_factory=True)
    return out


DEFAULTS = _defaults(Settings)


def _norm(value: Any) -> str:
    """One spelling for a default however it is written: `true`/True, `{}`/{}, None/`—`."""
    if value is None or value in ("—", "", "null"):
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return str(value)
    text = str(value).strip("`")
    return {"True": "true", "False": "false"}.get(text, text)


def _readme_table() -> dict[str, str]:
    """`| `CW_A` / `CW_B` | `1` / `2` | meaning |` rows → {CW_A: "1", CW_B: "2"}."""
    rows: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`CW_"):
            continue
        names = re.findall(r"`(CW_[A-Z_]+)`", cells[0])
        values = [v.strip() for v in cells[1].split(" / ")]
        if len(values) == 1:
            values = values * len(names)
        rows.update(zip(names, values, strict=True))
    return rows


def test_readme_table_lists_every_setting_with_its_default() -> None:
    table = _readme_table()
    missing = sorted(set(DEFAULTS) - set(table))
    unknown = sorted(set(table) - set(DEFAULTS))
    assert not missing and not unknown, f"README table lacks {missing}; names no setting: {unknown}"
    wrong = {
        name: (table[name], DEFAULTS[name])
        for name in DEFAULTS
        if _norm(table[name]) != _norm(DEFAULTS[name]) and not _words_for_none(table[name], DEFAULTS[name])
    }
    assert wrong == {}, f"README default differs from the code (README, code): {wrong}"


def _words_for_none(readme: str, default: Any) -> bool:
    """A None default is documented in words ("bundled model", "bundle's own", "all cores")."""
    return default is None and not readme.startswith("`")


def _chart_settings() -> dict[str, Any]:
    """CW_* → the chart's default value, following `CW_X: {{ .Values.a.b | quote }}` lines (the
    optional ones, rendered only when set, have no default of their own)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    out: dict[str, Any] = {}
    text = (CHART / "templates" / "configmap.yaml").read_text()
    for env, path in re.findall(r"(CW_[A-Z_]+): \{\{ \.Values\.([\w.]+)", text):
        node: Any = values
        for part in path.split("."):
            node = node[part]
        out[env] = node
    return out


def test_chart_defaults_match_the_code_or_say_why_not() -> None:
    chart = _chart_settings()
    assert chart, "no CW_* settings found in the chart's ConfigMap"
    unknown = sorted(set(chart) - set(DEFAULTS))
    assert unknown == [], f"chart sets settings that do not exist: {unknown}"
    drift = {
        env: (chart[env], DEFAULTS[env])
        for env in chart
        if env not in CHART_DIFFERS and _norm(chart[env]) not in (_norm(DEFAULTS[env]), "none")
    }
    assert drift == {}, f"chart default differs from the code (chart, code): {drift}"
    stale = sorted(e for e in CHART_DIFFERS if e in chart and _norm(chart[e]) == _norm(DEFAULTS[e]))
    assert stale == [], f"listed as deliberate differences but equal now: {stale}"


def test_compose_values_match_the_code_or_say_why_not() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env: dict[str, Any] = {}
    for svc in compose["services"].values():
        env.update({k: v for k, v in (svc.get("environment") or {}).items() if k.startswith("CW_")})
    drift = {
        k: (v, DEFAULTS.get(k))
        for k, v in env.items()
        if k not in COMPOSE_DIFFERS and _norm(v) != _norm(DEFAULTS.get(k, "<not a setting>"))
    }
    assert drift == {}, f"docker-compose value differs from the code without a reason (compose, code): {drift}"


@pytest.mark.parametrize("env", sorted(CHART_DIFFERS | COMPOSE_DIFFERS))
def test_listed_differences_name_real_settings(env: str) -> None:
    assert env in DEFAULTS, f"{env} is not a setting"
