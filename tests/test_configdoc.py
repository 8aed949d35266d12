"""relay.config.doc: etc/relay.toml and docs/configuration.md come from the one
declaration of the keys in relay.config, document exactly the declared keys,
and are current (``python -m relay.config.doc`` rewrites them)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import unittest
from unittest import mock

from relay import config as configmod
from relay.config import doc as configdoc
from relay.config import values as v

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "etc", "relay.toml")
REFERENCE = os.path.join(ROOT, "docs", "configuration.md")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class Current(unittest.TestCase):
    def test_sample_is_generated_from_the_declaration(self):
        self.assertEqual(_read(SAMPLE), configdoc.relay_toml(),
                         "etc/relay.toml is not current: run .venv/bin/python -m relay.config.doc")

    def test_reference_is_generated_from_the_declaration(self):
        text = _read(REFERENCE)
        self.assertEqual(text, configdoc.configuration_md(text),
                         "docs/configuration.md is not current: run .venv/bin/python -m relay.config.doc")

    def test_reference_names_every_key(self):
        text = _read(REFERENCE)
        for dotted in configmod.declared_keys():
            self.assertIn(f"### `{dotted}`", text)


class ExactlyTheDeclaredKeys(unittest.TestCase):
    def test_sample_documents_exactly_the_declared_keys(self):
        documented = configdoc.documented_keys(_read(SAMPLE))
        self.assertEqual(sorted(documented), sorted(configmod.declared_keys()))
        self.assertEqual(len(documented), len(set(documented)), "a key shown twice")
        # the four the old hand list of tests/test_config.py missed
        for dotted in ("workers", "relay.smarthost_ca_file", "metrics.listen", "log.format"):
            self.assertIn(dotted, documented)

    def test_every_set_key_is_a_real_key_of_the_file(self):
        data = tomllib.loads(_read(SAMPLE))
        set_keys = {f"{s}.{k}" if isinstance(t, dict) else s
                    for s, t in data.items() for k in (t if isinstance(t, dict) else [None])}
        self.assertLessEqual(set_keys, set(configmod.declared_keys()))
        self.assertEqual(set(configdoc.documented_keys(_read(SAMPLE))) - set_keys, {"hostname"})

    def test_a_key_missing_from_the_sample_is_seen(self):
        text = "\n".join(line for line in _read(SAMPLE).split("\n") if not line.startswith("smarthost_ca_file ="))
        self.assertNotIn("relay.smarthost_ca_file", configdoc.documented_keys(text))

    def test_every_declared_key_has_a_doc_line(self):
        self.assertEqual(configdoc.undocumented(), [])

    def test_a_key_without_a_doc_line_is_refused(self):
        @dataclasses.dataclass(frozen=True)
        class Extra:
            documented: int = configmod.declare(1, v.integer(0), "Has one.")
            bare: int = configmod.declare(2, v.integer(0), "  ")

        sections = (*configmod.schema(), configmod._declared("extra", Extra))
        keys = {k.dotted: k for s in sections for k in s.keys}
        with mock.patch.object(configmod, "declared_keys", return_value=keys):
            self.assertEqual(configdoc.undocumented(), ["extra.bare"])
            self.assertEqual(configdoc.main(["--check"]), 2)

    def test_every_refinement_runs(self):
        refined = {k.dotted for k in configmod.declared_keys().values() if k.spec.refine}
        ordered = [getattr(r, "refines", None) for r in configmod._RULES]
        self.assertEqual(sorted(refined), sorted(r for r in ordered if r))


class SampleMeansTheDefaults(unittest.TestCase):
    """The sample's values are the built-in defaults: the file with its keys
    set loads to exactly what an empty file gives."""

    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="relay-doc-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def _load(self, text: str) -> configmod.Config:
        path = os.path.join(self.dir, "relay.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return configmod.load(path)

    def test_sample_values_are_the_defaults(self):
        self.assertEqual(self._load(_read(SAMPLE)), self._load(""))

    def test_dataclass_defaults_are_the_file_defaults(self):
        for k in configmod.declared_keys().values():
            if k.spec.default is None:
                continue
            cls = configmod.Config if not k.section else type(getattr(configmod.load(None), k.section))
            field = {f.name: f for f in dataclasses.fields(cls)}[k.name]
            if field.default is not dataclasses.MISSING:
                self.assertEqual(field.default, k.spec.convert(k.spec.default), k.dotted)

    def test_examples_are_valid(self):
        for k in configmod.declared_keys().values():
            if k.spec.example is not None:
                k.spec.convert(k.spec.example)


class Command(unittest.TestCase):
    """``python -m relay.config.doc`` as a real process, on a copy of the files."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="relay-doc-root-")
        self.addCleanup(shutil.rmtree, self.root, True)
        for rel in (os.path.join("etc", "relay.toml"), os.path.join("docs", "configuration.md")):
            os.makedirs(os.path.join(self.root, os.path.dirname(rel)), exist_ok=True)
            shutil.copy(os.path.join(ROOT, rel), os.path.join(self.root, rel))

    def run_configdoc(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.run([sys.executable, "-m", "relay.config.doc", "--root", self.root, *args],
                              capture_output=True, text=True, env=env, timeout=60)

    def test_check_passes_on_current_files(self):
        p = self.run_configdoc("--check")
        self.assertEqual(p.returncode, 0, p.stderr)

    def test_stale_files_are_named_then_rewritten(self):
        sample = os.path.join(self.root, "etc", "relay.toml")
        ref = os.path.join(self.root, "docs", "configuration.md")
        with open(sample, "a", encoding="utf-8") as f:
            f.write("# edited by hand\n")
        text = _read(ref)
        with open(ref, "w", encoding="utf-8") as f:
            f.write(text.replace("### `smtp.timeout`", "### `smtp.timeout_old`"))
        p = self.run_configdoc("--check")
        self.assertEqual(p.returncode, 1)
        self.assertIn(os.path.join("etc", "relay.toml"), p.stderr)
        self.assertIn(os.path.join("docs", "configuration.md"), p.stderr)
        p = self.run_configdoc()
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(_read(sample), _read(SAMPLE))
        self.assertEqual(_read(ref), _read(REFERENCE))
        self.assertEqual(self.run_configdoc("--check").returncode, 0)


if __name__ == "__main__":
    unittest.main()
