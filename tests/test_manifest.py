"""The workspace manifest: what it accepts, and one precise error for each kind of bad input."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from comfyfleet.errors import ConfigError, ManifestError
from comfyfleet.manifest import Manifest, check_workspace, load_manifest, parse_manifest
from tests.conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "manifest.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHA = "ab" * 32


def write(tmp_path: Path, text: str, name: str = "manifest.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error_of(tmp_path: Path, text: str) -> ManifestError:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value


# -- what it accepts ------------------------------------------------------------


def test_example_manifest_mirrors_the_seeds_models_and_nodes() -> None:
    m = load_manifest(EXAMPLE)
    names = {model.known_name for model in m.models}
    # The seeds' corrected file names, and their gated FLUX models.
    for name in (
        "ponyDiffusionV6XL.safetensors",
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "wan_2.1_vae.safetensors",
        "mm_sdxl_v10_beta.ckpt",
        "flux1-dev.safetensors",
        "flux1-schnell.safetensors",
        "flux_ae.safetensors",
    ):
        assert name in names
    schemes = {s.split("://")[0] for model in m.models for s in model.all_sources}
    assert schemes == {"hf", "civitai", "https"}
    assert any(len(model.all_sources) > 1 for model in m.models)  # HF first, Dropbox fallback
    assert len(m.custom_nodes) >= 4 and all(len(n.commit) == 40 for n in m.custom_nodes)
    assert "--use-sage-attention" in m.comfyui.args
    assert any(p.startswith("sageattention") for p in m.pip)
    assert any(p.startswith("triton") for p in m.pip)
    flux = [model for model in m.models if "FLUX" in (model.source or "")]
    assert flux and not any(model.critical for model in flux)


def test_a_full_manifest_parses_with_defaults_and_normalised_values(tmp_path: Path) -> None:
    (tmp_path / "wf.json").write_text("{}")
    m = load_manifest(
        write(
            tmp_path,
            f"""
            comfyui:
              path: ./comfy//
              args: [--fast]
            custom_nodes:
              - git: https://github.com/acme/ComfyUI-Thing.git
                commit: {COMMIT.upper()}
            models:
              - source: hf://acme/models/sub/dir/model.safetensors@v1.0
                dest: checkpoints/
                sha256: {SHA.upper()}
                size: 123
              - sources: [civitai://42, "https://www.dropbox.com/scl/fi/x/l.safetensors?dl=0"]
                dest: loras/style
                name: style.safetensors
                critical: false
            workflows:
              - file: wf.json
            config_files:
              - path: user/default/comfy.settings.json
                content: "{{}}"
            pip: [sageattention]
            warmup_workflow: wf.json
            """,
        )
    )
    assert m.comfyui.path == "comfy"
    assert m.custom_nodes[0].folder == "ComfyUI-Thing"
    assert m.custom_nodes[0].commit == COMMIT and m.custom_nodes[0].critical
    first, second = m.models
    assert first.dest == "checkpoints" and first.known_name == "model.safetensors"
    assert first.sha256 == SHA and first.size == 123 and first.critical
    assert second.all_sources[0] == "civitai://42" and not second.critical
    assert m.warmup is not None and m.warmup.file_name == "wf.json"
    layout = m.layout(tmp_path / "ws")
    assert layout.models == tmp_path / "ws" / "comfy" / "models"
    assert layout.model_path(second, "style.safetensors") == (
        tmp_path / "ws/comfy/models/loras/style/style.safetensors"
    )


def test_an_empty_manifest_is_an_empty_workspace(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, ""))
    assert m.models == [] and m.custom_nodes == [] and m.comfyui.path == "ComfyUI"


# -- bad input: one clear error each, with file, field and line ---------------


def test_unknown_key_names_the_field_suggests_the_fix_and_gives_the_line(tmp_path: Path) -> None:
    err = error_of(
        tmp_path,
        """
        models:
          - source: hf://a/b/c.safetensors
            dest: vae
            sha265: abc
        """,
    )
    assert isinstance(err, ConfigError)  # exit status 2 in the CLI
    assert err.source == str(tmp_path / "manifest.yaml")
    assert err.field == "models[0].sha265"
    assert "unknown field 'sha265'; did you mean 'sha256'?" in str(err)
    assert str(err).endswith("(line 4)")


def test_unknown_top_level_key_lists_the_known_ones(tmp_path: Path) -> None:
    err = error_of(tmp_path, "modles: []\n")
    assert err.field == "modles"
    assert "did you mean 'models'" in str(err) and "(line 1)" in str(err)


def test_unknown_key_in_a_custom_node(tmp_path: Path) -> None:
    err = error_of(
        tmp_path,
        f"""
        custom_nodes:
          - git: https://github.com/a/b
            commit: {COMMIT}
            branch: main
        """,
    )
    assert err.field == "custom_nodes[0].branch" and "(line 4)" in str(err)


@pytest.mark.parametrize(
    ("dest", "words"),
    [
        ("../etc", "which escapes it"),
        ("checkpoints/../../x", "which escapes it"),
        ("/etc/cron.d", "absolute path"),
        ("models/checkpoints", "write 'checkpoints', not 'models/checkpoints'"),
        (".", "such as checkpoints"),
        ('"a\\\\b"', "'/' separators"),
    ],
)
def test_a_destination_that_escapes_models_is_refused(
    tmp_path: Path, dest: str, words: str
) -> None:
    err = error_of(
        tmp_path,
        f"""
        models:
          - source: hf://a/b/ok.safetensors
            dest: vae
          - source: hf://a/b/c.safetensors
            dest: {dest}
        """,
    )
    assert err.field == "models[1].dest"
    assert words in str(err)
    assert "(line 5)" in str(err)


def test_a_file_name_with_a_slash_is_refused(tmp_path: Path) -> None:
    err = error_of(
        tmp_path,
        """
        models:
          - source: civitai://1
            dest: loras
            name: ../../evil.safetensors
        """,
    )
    assert err.field == "models[0].name" and "without '/'" in str(err)


def test_two_models_with_the_same_target_are_refused(tmp_path: Path) -> None:
    err = error_of(
        tmp_path,
        """
        models:
          - source: hf://a/b/vae.safetensors
            dest: vae
          - source: hf://c/d/other.safetensors
            dest: loras
          - source: https://example.com/anything
            dest: vae/
            name: vae.safetensors
        """,
    )
    assert err.field == "models[2]"
    assert "same target as models[0]: models/vae/vae.safetensors" in str(err)
    assert "(line 6)" in str(err)


@pytest.mark.parametrize(
    "sha", ["abc123", "g" * 64, "a" * 63, "a" * 65, "sha256:" + "a" * 64, "12345"]
)
def test_a_malformed_sha256_is_refused(tmp_path: Path, sha: str) -> None:
    err = error_of(
        tmp_path,
        f"""
        models:
          - source: hf://a/b/c.safetensors
            dest: vae
            sha256: {sha}
        """,
    )
    assert err.field == "models[0].sha256"
    assert "sha256" in str(err) and "(line 4)" in str(err)
    # a number in YAML is not a hash either: the message says to quote it, or what is wrong
    assert "64 hexadecimal characters" in str(err) or "quote it" in str(err)


def test_source_and_sources_are_exclusive_and_one_is_required(tmp_path: Path) -> None:
    both = error_of(
        tmp_path,
        """
        models:
          - source: hf://a/b/c.safetensors
            sources: [hf://a/b/c.safetensors]
            dest: vae
        """,
    )
    assert both.field == "models[0]" and "not both" in str(both)
    neither = error_of(tmp_path, "models:\n  - dest: vae\n")
    assert neither.field == "models[0]"
    empty = error_of(tmp_path, "models:\n  - sources: []\n    dest: vae\n")
    assert empty.field == "models[0].sources" and "at least one source" in str(empty)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("ftp://host/file", "expected a source starting with hf://"),
        ("hf://only-owner", "hf://OWNER/REPO/PATH"),
        ("civitai://pony", "civitai://MODEL_VERSION_ID"),
        ("https:///nohost", "with a host"),
    ],
)
def test_a_source_that_no_resolver_understands_is_refused(
    tmp_path: Path, source: str, words: str
) -> None:
    err = error_of(tmp_path, f"models:\n  - source: '{source}'\n    dest: vae\n")
    assert err.field == "models[0].source" and words in str(err)


def test_a_custom_node_needs_a_full_commit(tmp_path: Path) -> None:
    err = error_of(
        tmp_path,
        """
        custom_nodes:
          - git: https://github.com/a/b
            commit: main
        """,
    )
    assert err.field == "custom_nodes[0].commit"
    assert "full commit id" in str(err) and "(line 3)" in str(err)


def test_two_custom_nodes_in_one_folder_are_refused(tmp_path: Path) -> None:
    err = error_of(
        tmp_path,
        f"""
        custom_nodes:
          - git: https://github.com/a/Thing
            commit: {COMMIT}
          - git: https://gitlab.com/b/Thing.git
            commit: {COMMIT}
        """,
    )
    assert err.field == "custom_nodes[1]" and "custom_nodes/Thing" in str(err)


def test_wrong_types_say_what_was_expected(tmp_path: Path) -> None:
    err = error_of(tmp_path, "models:\n  - source: hf://a/b/c\n    dest: vae\n    size: big\n")
    assert err.field == "models[0].size" and "a whole number" in str(err)
    err = error_of(tmp_path, "models:\n  - source: hf://a/b/c\n    dest: vae\n    size: -1\n")
    assert "expected a number >= 0, got -1" in str(err)
    err = error_of(tmp_path, "models: {a: 1}\n")
    assert err.field == "models" and "a list" in str(err)


def test_warmup_workflow_must_be_a_listed_workflow(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    err = error_of(
        tmp_path,
        """
        workflows:
          - file: a.json
        warmup_workflow: b.json
        """,
    )
    assert err.field == "warmup_workflow" and "a.json" in str(err) and "(line 3)" in str(err)


def test_a_workflow_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    err = error_of(tmp_path, "workflows:\n  - file: missing.json\n")
    assert err.field == "workflows[0].file" and "no such file" in str(err)


def test_config_files_stay_in_comfyuis_folder(tmp_path: Path) -> None:
    err = error_of(tmp_path, "config_files:\n  - path: ../../etc/passwd\n    content: x\n")
    assert err.field == "config_files[0].path" and "escapes" in str(err)
    err = error_of(tmp_path, "config_files:\n  - path: a.yaml\n")
    assert "exactly one of content:, file: or source:" in str(err)


def test_comfyui_arguments_may_not_choose_the_address_or_port(tmp_path: Path) -> None:
    err = error_of(tmp_path, "comfyui:\n  args: [--fast, --listen=0.0.0.0]\n")
    assert err.field == "comfyui.args" and "127.0.0.1 only" in str(err) and "(line 2)" in str(err)


def test_invalid_yaml_and_missing_files_are_one_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, "models: [\n")
    assert "invalid YAML at line" in str(err)
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "nope.yaml")
    err = error_of(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in str(err)


def test_a_symlink_in_the_workspace_that_leads_out_of_models_is_refused(tmp_path: Path) -> None:
    m = parse_manifest(
        "models:\n  - source: hf://a/b/c.safetensors\n    dest: loras\n"
        "  - source: hf://a/b/d.safetensors\n    dest: vae\n",
        source="m.yaml",
    )
    ws = tmp_path / "ws"
    models = ws / "ComfyUI" / "models"
    models.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check_workspace(m, ws)  # nothing there yet: fine
    (models / "vae").symlink_to(elsewhere)
    with pytest.raises(ManifestError) as info:
        check_workspace(m, ws)
    assert info.value.field == "models[1].dest"
    assert "through a symlink" in str(info.value) and "(line 5)" in str(info.value)


def test_a_symlinked_models_folder_is_fine_when_everything_stays_inside_it(
    tmp_path: Path,
) -> None:
    m = parse_manifest("models:\n  - source: hf://a/b/c.safetensors\n    dest: loras\n")
    big_disk = tmp_path / "big" / "models"
    (big_disk / "loras").mkdir(parents=True)
    comfy = tmp_path / "ws" / "ComfyUI"
    comfy.mkdir(parents=True)
    os.symlink(big_disk, comfy / "models")
    check_workspace(m, tmp_path / "ws")
    # ...but a file that is itself a link out of it is not.
    (big_disk / "loras" / "c.safetensors").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ManifestError, match="through a symlink"):
        check_workspace(m, tmp_path / "ws")


def test_values_are_not_coerced_and_a_loaded_manifest_is_frozen() -> None:
    with pytest.raises(ManifestError, match="true or false"):
        parse_manifest("models:\n  - source: hf://a/b/c\n    dest: vae\n    critical: maybe\n")
    m = parse_manifest("pip: [a]\n")
    assert isinstance(m, Manifest)
    with pytest.raises(ValidationError):
        m.pip = ["b"]


# -- the CLI ----------------------------------------------------------------------


def test_manifest_check_without_resolving_prints_the_models_and_the_known_total(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        f"""
        models:
          - source: hf://a/b/one.safetensors
            dest: vae
            size: 1500000000
            sha256: {SHA}
          - source: civitai://7
            dest: loras
            name: two.safetensors
            size: 500000000
        """,
    )
    result = run_cli("manifest", "check", str(path), "--no-resolve", env=clean_env)
    assert result.returncode == 0, result.stderr
    assert "ComfyUI/models/vae/one.safetensors" in result.stdout
    assert "total to download: 2.00 GB (2000000000 bytes) for 2 models" in result.stdout

    as_json = run_cli("manifest", "check", str(path), "--no-resolve", "--json", env=clean_env)
    data = json.loads(as_json.stdout)
    assert data["total_bytes"] == 2_000_000_000 and data["ok"] is True
    assert [m["target"] for m in data["models"]] == [
        "ComfyUI/models/vae/one.safetensors",
        "ComfyUI/models/loras/two.safetensors",
    ]


def test_manifest_check_of_a_bad_manifest_is_one_red_line_and_exit_2(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    path = write(tmp_path, "models:\n  - source: hf://a/b/c\n    dest: /abs\n")
    result = run_cli("manifest", "check", str(path), env=clean_env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert f"{path}: models[0].dest: expected a folder under models/" in lines[0]
    assert "(line 3)" in lines[0]


def test_inlined_carries_the_files_beside_the_manifest_to_an_agent_elsewhere(
    tmp_path: Path,
) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "t2i.json").write_text('{"1": {"class_type": "SaveImage"}}')
    (tmp_path / "extra.yaml").write_text("comfyui:\n  base_path: /workspace\n")
    path = write(
        tmp_path,
        """
        workflows:
          - file: flows/t2i.json
        config_files:
          - path: extra_model_paths.yaml
            file: extra.yaml
        warmup_workflow: t2i.json
        """,
    )
    inlined = load_manifest(path).inlined()
    (workflow,) = inlined.workflows
    assert workflow.file is None and workflow.name == "t2i.json"
    assert json.loads(workflow.content or "") == {"1": {"class_type": "SaveImage"}}
    assert inlined.config_files[0].content == "comfyui:\n  base_path: /workspace\n"
    assert inlined.warmup is workflow
    # What the control plane sends at registration parses back on the agent's side.
    again = Manifest.model_validate(inlined.model_dump(mode="json"))
    assert again.workflows[0].content == workflow.content

    (tmp_path / "flows" / "t2i.json").unlink()
    with pytest.raises(ManifestError) as caught:
        load_manifest(path).inlined()
    assert "flows/t2i.json" in str(caught.value)
