"""The dependency catalog: what it accepts, one precise line for each kind of bad input,
its YAML round trip, and imports merged into it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from comfyfleet.agent import cache
from comfyfleet.deps import (
    CatalogEntry,
    DependencyCatalog,
    DependencyProfile,
    DynamicPolicy,
    load_catalog,
    parse_catalog,
)
from comfyfleet.errors import ConfigError
from comfyfleet.profiles import load_fleet
from comfyfleet.sizes import GB, MB, GiB
from tests.conftest import EXAMPLE_FLEET, REPO

EXAMPLE = REPO / "examples" / "deps.yaml"
SDXL = "hf://stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors"
SHA = "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"
COMMIT = "55c6889b3b82e8aa826436e08ae2fd8fbda554c0"
HF_TOKEN_VALUE = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
CIVITAI_TOKEN_VALUE = "0123456789abcdef0123456789abcdef"


def catalog_text(entry: str = "", profile: str = "", *, warm: str | None = None) -> str:
    """A small catalog: an SDXL checkpoint and a Civitai LoRA (lines 1-11), ``entry`` as its
    third entry (line 12 on), then a ``default`` server type keeping ``sdxl-base`` (and
    ``warm``) with ``profile`` lines added to it."""
    lines = [
        "entries:",
        "  - id: sdxl-base",
        "    kind: model",
        f"    source: {SDXL}",
        "    destination: checkpoints/sd_xl_base_1.0.safetensors",
        "    size: 6938078334",
        "  - id: add-detail-xl",
        "    kind: model",
        "    source: civitai://135867",
        "    destination: loras/add-detail-xl.safetensors",
        "    size: 228MB",
    ]
    if entry.strip():
        lines += textwrap.indent(textwrap.dedent(entry).strip("\n"), "  ").splitlines()
    lines += ["profiles:", "  default:", "    static:", "      core: [sdxl-base]"]
    if warm is not None:
        lines.append(f"      warm: {warm}")
    if profile.strip():
        lines += textwrap.indent(textwrap.dedent(profile).strip("\n"), "    ").splitlines()
    return "\n".join(lines) + "\n"


def error_of(text: str, *, source: str = "deps.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_catalog(text, source=source)
    return str(info.value)


# -- what it accepts ------------------------------------------------------------


def test_example_catalog_has_the_sdxl_stack_a_civitai_lora_flux_and_two_server_types() -> None:
    catalog = load_catalog(EXAMPLE)

    sdxl = catalog.entry("sdxl-base")
    assert sdxl.source.startswith("hf://") and sdxl.sha256 == SHA
    assert sdxl.comfy_path == "models/checkpoints/sd_xl_base_1.0.safetensors"
    assert sdxl.size == 6_938_078_334
    lora = catalog.entry("add-detail-xl")
    assert lora.source == "civitai://135867" and lora.token == "CIVITAI_TOKEN"
    assert (lora.folder, lora.in_folder) == ("loras", "detail/add-detail-xl.safetensors")
    assert catalog.entry("sdxl-vae-fp16-fix").comfy_path == "models/vae/sdxl_vae.safetensors"
    assert catalog.entry("controlnet-union-sdxl").folder == "controlnet"
    assert catalog.entry("studio-style-xl").source.startswith("https://www.dropbox.com/")
    node = catalog.entry("advanced-controlnet")
    assert node.kind == "custom_node" and node.commit == COMMIT
    assert node.comfy_path == "custom_nodes/ComfyUI-Advanced-ControlNet"
    assert catalog.entry("flux1-dev").token == "HF_TOKEN"

    # Its server types are the profiles of the example fleet.
    assert set(catalog.profiles) == set(load_fleet(EXAMPLE_FLEET).profiles) == {"default", "flux"}
    sdxl_type = catalog.profile("default")
    assert sdxl_type.static.core == ["sdxl-base", "sdxl-vae-fp16-fix", "advanced-controlnet"]
    assert sdxl_type.static.warm == ["controlnet-union-sdxl"]
    assert sdxl_type.prefetch_on_boot
    assert sdxl_type.dynamic == DynamicPolicy(
        enabled=True,
        min_free_bytes=20 * GB,
        max_dynamic_bytes=100 * GB,
        eviction_batch_max=20,
        pin_ttl_seconds=1800,
    )
    assert catalog.profile("flux").dynamic.max_dynamic_bytes is None
    # Every LoRA is dynamic: no server type keeps one for good.
    static = {dep for p in catalog.profiles.values() for dep in p.static_ids}
    assert {"add-detail-xl", "studio-style-xl"}.isdisjoint(static)


def test_sizes_are_read_as_people_write_them() -> None:
    catalog = parse_catalog(
        catalog_text(
            entry="""
            - id: vae
              kind: model
              source: hf://madebyollin/sdxl-vae-fp16-fix/sdxl_vae.safetensors
              destination: vae/sdxl_vae.safetensors
              size: 1.5GiB
            """,
            profile="""
                dynamic:
                  min_free_bytes: 10GB
                  max_dynamic_bytes: 500MB
            """,
        )
    )
    assert catalog.entry("add-detail-xl").size == 228 * MB
    assert catalog.entry("vae").size == int(1.5 * GiB)
    assert catalog.profile("default").dynamic.min_free_bytes == 10 * GB
    assert catalog.profile("default").dynamic.max_dynamic_bytes == 500 * MB


@pytest.mark.parametrize("cap", ["null", "0", "none", "unlimited"])
def test_a_dynamic_cap_of_null_zero_none_or_unlimited_means_no_cap_as_in_the_seed(
    cap: str,
) -> None:
    text = catalog_text(profile=f"dynamic: {{enabled: true, max_dynamic_bytes: {cap}}}")
    assert parse_catalog(text).profile("default").dynamic.max_dynamic_bytes is None


def test_the_dynamic_policy_defaults_are_the_seeds_and_the_agent_cache_reads_it() -> None:
    policy = DependencyProfile().dynamic
    assert policy.as_cache_policy() == cache.DynamicPolicy()
    assert (policy.eviction_batch_max, policy.pin_ttl_seconds) == (20, 1800)
    assert not policy.enabled and policy.max_dynamic_bytes is None
    assert DependencyProfile().prefetch_on_boot


def test_a_model_destination_that_is_a_folder_keeps_the_hf_file_name() -> None:
    catalog = parse_catalog(
        catalog_text(
            entry="""
            - id: flux1-dev
              kind: model
              source: hf://black-forest-labs/FLUX.1-dev/flux1-dev.safetensors@main
              destination: diffusion_models/
              size: 23.8GB
              token: HF_TOKEN
            """
        )
    )
    entry = catalog.entry("flux1-dev")
    assert entry.destination == "diffusion_models/flux1-dev.safetensors"
    assert entry.filename == "flux1-dev.safetensors"


def test_a_custom_node_is_a_pinned_git_checkout_with_no_size_to_give() -> None:
    catalog = parse_catalog(
        catalog_text(
            entry=f"""
            - id: impact-pack
              kind: custom_node
              source: https://github.com/ltdrdata/ComfyUI-Impact-Pack
              destination: ComfyUI-Impact-Pack
              commit: {COMMIT.upper()}
            """
        )
    )
    node = catalog.entry("impact-pack")
    assert (node.size, node.commit, node.folder) == (0, COMMIT, None)
    manifest_node = node.as_custom_node()
    assert (manifest_node.git, manifest_node.commit, manifest_node.folder) == (
        "https://github.com/ltdrdata/ComfyUI-Impact-Pack",
        COMMIT,
        "ComfyUI-Impact-Pack",
    )


def test_an_entry_becomes_the_manifests_model_for_the_provisioning_engine() -> None:
    entry = load_catalog(EXAMPLE).entry("add-detail-xl")
    model = entry.as_manifest_model()
    assert (model.source, model.dest, model.name, model.size) == (
        "civitai://135867",
        "loras/detail",
        "add-detail-xl.safetensors",
        None,  # the catalog's size may be approximate; the manifest's is exact
    )


# -- one line for each kind of bad input ------------------------------------------


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        (
            "../../etc/cron.d/x",
            "deps.yaml: entries[2].destination: expected a file under models/, "
            "got '../../etc/cron.d/x', which escapes it (line 15)",
        ),
        (
            "checkpoints/../../x.safetensors",
            "deps.yaml: entries[2].destination: expected a file under models/, "
            "got 'checkpoints/../../x.safetensors', which escapes it (line 15)",
        ),
        (
            "/workspace/x.safetensors",
            "deps.yaml: entries[2].destination: expected a file under models/, "
            "got an absolute path '/workspace/x.safetensors' (line 15)",
        ),
        (
            "models/loras/x.safetensors",
            "deps.yaml: entries[2].destination: destination is under models/: "
            "write 'loras/x.safetensors', not 'models/loras/x.safetensors' (line 15)",
        ),
        (
            "x.safetensors",
            "deps.yaml: entries[2].destination: expected a file in a folder of models/, "
            "such as checkpoints/x.safetensors, got 'x.safetensors' (line 15)",
        ),
        (
            "loras/",
            "deps.yaml: entries[2].destination: expected a file under models/ such as "
            "loras/model.safetensors (a civitai:// source does not say its file name), "
            "got 'loras/' (line 15)",
        ),
    ],
)
def test_a_destination_outside_its_folder_is_refused_with_its_line(
    destination: str, expected: str
) -> None:
    text = catalog_text(
        entry=f"""
        - id: x
          kind: model
          source: civitai://1
          destination: {destination}
          size: 1MB
        """
    )
    assert error_of(text) == expected


def test_a_custom_node_folder_cannot_escape_custom_nodes() -> None:
    text = catalog_text(
        entry=f"""
        - id: x
          kind: custom_node
          source: https://github.com/acme/x
          destination: ../../x
          commit: {COMMIT}
        """
    )
    assert error_of(text) == (
        "deps.yaml: entries[2].destination: expected a folder under custom_nodes/ "
        "without '/', got '../../x' (line 15)"
    )


def test_a_profile_naming_an_unknown_id_is_refused_with_the_closest_id() -> None:
    text = catalog_text(warm="[add-detail-lx]")
    assert error_of(text) == (
        "deps.yaml: profiles.default.static.warm[0]: no catalog entry has the id "
        "'add-detail-lx'; did you mean 'add-detail-xl'? (line 16)"
    )
    text = catalog_text(warm="[flux1-dev]")
    assert error_of(text) == (
        "deps.yaml: profiles.default.static.warm[0]: no catalog entry has the id "
        "'flux1-dev'; the catalog's ids are: sdxl-base, add-detail-xl (line 16)"
    )


def test_an_id_listed_twice_in_a_profile_is_refused() -> None:
    text = catalog_text(warm="[sdxl-base]")
    assert error_of(text) == (
        "deps.yaml: profiles.default.static.warm[0]: 'sdxl-base' is listed twice: "
        "already profiles.default.static.core[0] (line 15) (line 16)"
    )


def test_an_id_given_twice_is_refused_naming_both_lines() -> None:
    text = catalog_text(
        entry="""
        - id: sdxl-base
          kind: model
          source: civitai://1
          destination: checkpoints/other.safetensors
          size: 1MB
        """
    )
    assert error_of(text) == (
        "deps.yaml: entries[2].id: id 'sdxl-base' is already the id of entries[0] (line 2); "
        "give each entry its own (line 12)"
    )


def test_two_entries_with_one_destination_are_refused() -> None:
    text = catalog_text(
        entry=f"""
        - id: sdxl-base-copy
          kind: model
          source: {SDXL}
          destination: checkpoints/
          size: 6.9GB
        """
    )
    assert error_of(text) == (
        "deps.yaml: entries[2].destination: same destination as entry 'sdxl-base' at "
        "entries[0] (line 2): models/checkpoints/sd_xl_base_1.0.safetensors; give one of "
        "them another destination (line 15)"
    )


@pytest.mark.parametrize("pasted", [HF_TOKEN_VALUE, CIVITAI_TOKEN_VALUE])
def test_a_token_value_pasted_for_its_name_is_refused_and_never_shown(pasted: str) -> None:
    text = catalog_text(
        entry=f"""
        - id: x
          kind: model
          source: https://civitai.com/api/download/models/1
          destination: loras/x.safetensors
          size: 1MB
          token: {pasted}
        """
    )
    message = error_of(text)
    assert message == (
        "deps.yaml: entries[2].token: this looks like a token's value, not its name: write "
        "token: HF_TOKEN or token: CIVITAI_TOKEN (the name), set the value in the control "
        "plane's environment, and revoke the pasted token, which is now in this file (line 17)"
    )
    assert pasted not in message


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("GITHUB_TOKEN", "expected the name of a secret, HF_TOKEN or CIVITAI_TOKEN, "),
        ("hf_token", "expected HF_TOKEN, in capitals as the variable is named"),
        ("HF_TOKEN", "civitai:// sources take CIVITAI_TOKEN, not HF_TOKEN"),
    ],
)
def test_a_token_must_be_the_name_of_the_secret_its_source_takes(token: str, reason: str) -> None:
    text = catalog_text(
        entry=f"""
        - id: x
          kind: model
          source: civitai://1
          destination: loras/x.safetensors
          size: 1MB
          token: {token}
        """
    )
    message = error_of(text)
    assert message.startswith(f"deps.yaml: entries[2].token: {reason}")
    assert message.endswith("(line 17)")


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ("ten GB", "cannot read a size from 'ten GB': write bytes, or a number and a unit: "),
        ("-5GB", "a size cannot be negative, got '-5GB': "),
        ("6.9XB", "cannot read a size from '6.9XB': unknown unit 'XB'; "),
        ("1.5", "cannot read a size from '1.5': there are no fractions of a byte; "),
    ],
)
def test_a_bad_size_is_refused_with_an_example_of_a_good_one(size: str, reason: str) -> None:
    text = catalog_text(
        entry=f"""
        - id: x
          kind: model
          source: civitai://1
          destination: loras/x.safetensors
          size: "{size}"
        """
    )
    message = error_of(text)
    assert message.startswith(f"deps.yaml: entries[2].size: {reason}")
    assert "e.g. 10GB" in message and message.endswith("(line 16)")


def test_a_bad_size_in_the_dynamic_policy_names_its_field() -> None:
    text = catalog_text(profile="dynamic:\n  min_free_bytes: lots")
    message = error_of(text)
    assert message.startswith(
        "deps.yaml: profiles.default.dynamic.min_free_bytes: cannot read a size from 'lots'"
    )
    assert message.endswith("(line 17)")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "- {id: Big Model, kind: model, source: 'civitai://1', destination: loras/x, size: 1}",
            "entries[2].id: expected a short id: lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter or a digit, at most 64 characters, got 'Big Model' (line 12)",
        ),
        (
            "- {id: x, kind: lora, source: 'civitai://1', destination: loras/x, size: 1}",
            "entries[2].kind: expected model or custom_node, got 'lora' (line 12)",
        ),
        (
            "- {id: x, kind: model, source: 'civitai://1', destination: loras/x}",
            "entries[2].size: expected a value: the field is required (line 12)",
        ),
        (
            "- {id: x, kind: model, source: 'civitai://1', destination: loras/x, sise: 1}",
            "entries[2].sise: unknown field 'sise'; did you mean 'size'? (line 12)",
        ),
        (
            "- {id: x, kind: model, source: 'ftp://h/x', destination: loras/x, size: 1}",
            "entries[2].source: expected a source starting with hf://, civitai://, https:// "
            "(Dropbox links included) or http:// (a host the allowlist names), got 'ftp://h/x' "
            "(line 12)",
        ),
        (
            "- {id: x, kind: custom_node, source: 'https://github.com/a/x', destination: x}",
            "entries[2]: a custom node is pinned: expected commit: the full commit id to check "
            "out (40 hex digits) (line 12)",
        ),
        (
            "- {id: x, kind: custom_node, source: 'hf://a/b/c', destination: x, commit: "
            f"{COMMIT}}}",
            "entries[2].source: expected a custom node's git repository "
            "(https://github.com/OWNER/REPO), got 'hf://a/b/c' (line 12)",
        ),
    ],
)
def test_each_kind_of_bad_entry_is_one_line(entry: str, expected: str) -> None:
    assert error_of(catalog_text(entry=entry)) == f"deps.yaml: {expected}"


def test_a_misspelt_policy_key_suggests_the_real_one() -> None:
    text = catalog_text(profile="dynamic:\n  max_bytes: 50GB")
    assert error_of(text) == (
        "deps.yaml: profiles.default.dynamic.max_bytes: unknown field 'max_bytes'; "
        "did you mean 'max_dynamic_bytes'? (line 17)"
    )


def test_a_file_that_is_not_a_catalog_is_one_line(tmp_path: Path) -> None:
    assert error_of("", source="d.yaml") == (
        "d.yaml: the file is empty; expected 'entries:' (the catalog) and 'profiles:' "
        "(server types)"
    )
    assert error_of("- a\n", source="d.yaml") == (
        "d.yaml: expected a mapping with 'entries:' and 'profiles:' at the top, got a list"
    )
    assert error_of("entries: [\n", source="d.yaml").startswith("d.yaml: invalid YAML at line 2")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such file"):
        load_catalog(missing)


def test_load_catalog_names_the_file_in_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "deps.yaml"
    path.write_text(catalog_text(warm="[nope]"))
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}: profiles.default.static.warm[0]: ")
    assert info.value.field == "profiles.default.static.warm[0]"


def test_lookups_of_unknown_ids_and_server_types_say_what_is_known() -> None:
    catalog = load_catalog(EXAMPLE)
    with pytest.raises(ConfigError, match=r"did you mean 'sdxl-base'\?"):
        catalog.entry("sdxl-bsae")
    with pytest.raises(
        ConfigError,
        match=r"no dependency profile for server type 'sdxl'; the catalog has: default, flux",
    ):
        catalog.profile("sdxl")


def test_the_models_check_the_same_when_built_from_data_not_yaml() -> None:
    # What the store and the API do: no file, no line, the same rules.
    entry = load_catalog(EXAMPLE).entry("sdxl-base")
    with pytest.raises(ValidationError, match=r"entries\[1\]\.id: id 'sdxl-base' is already"):
        DependencyCatalog(entries=[entry, entry])
    with pytest.raises(ValidationError, match="no catalog entry has the id 'nope'"):
        DependencyCatalog.model_validate({"profiles": {"default": {"static": {"core": ["nope"]}}}})
    data = entry.model_dump(mode="json")
    assert CatalogEntry.model_validate(data) == entry
    with pytest.raises(ValidationError, match="looks like a token's value"):
        CatalogEntry.model_validate({**data, "token": HF_TOKEN_VALUE})


# -- the YAML round trip ------------------------------------------------------------


def test_to_yaml_reads_back_equal_with_sizes_people_can_read() -> None:
    catalog = load_catalog(EXAMPLE)
    text = catalog.to_yaml()
    again = parse_catalog(text)
    assert again == catalog
    assert again.to_yaml() == text
    assert "min_free_bytes: 20GB" in text and "max_dynamic_bytes: 100GB" in text
    assert "size: 6938078334" in text  # not a round number of any unit: the bytes
    assert "core: [sdxl-base, sdxl-vae-fp16-fix, advanced-controlnet]" in text
    # A folder destination is written out whole, so the file no longer depends on it.
    assert "destination: vae/sdxl_vae.safetensors" in text


def test_an_empty_catalog_round_trips() -> None:
    assert parse_catalog(DependencyCatalog().to_yaml()) == DependencyCatalog()


# -- imports ------------------------------------------------------------------------


def test_an_import_adds_new_ids_replaces_changed_ones_and_says_which() -> None:
    catalog = load_catalog(EXAMPLE)
    imported = parse_catalog(
        textwrap.dedent(
            f"""
            entries:
              - id: sdxl-base
                kind: model
                source: {SDXL}
                destination: checkpoints/sd_xl_base_1.0.safetensors
                size: 6938078334
                sha256: {SHA}
              - id: add-detail-xl
                kind: model
                source: civitai://135867
                destination: loras/detail/add-detail-xl.safetensors
                size: 230MB
                token: CIVITAI_TOKEN
              - id: pixel-art-xl
                kind: model
                source: hf://nerijs/pixel-art-xl/pixel-art-xl.safetensors
                destination: loras/
                size: 170MB
            profiles:
              default:
                static:
                  core: [sdxl-base, sdxl-vae-fp16-fix]
              sdxl-lite:
                static:
                  core: [sdxl-base]
            """
        ),
        source="import.yaml",
        known_ids=catalog.ids,
    )
    merge = catalog.merge(imported)
    assert merge.added == ("pixel-art-xl",)
    assert merge.changed == ("add-detail-xl",)
    assert merge.unchanged == ("sdxl-base",)
    assert (merge.profiles_added, merge.profiles_changed) == (("sdxl-lite",), ("default",))
    merged = merge.catalog
    assert merged.ids == (*catalog.ids, "pixel-art-xl")  # replaced in place, added at the end
    assert merged.entry("add-detail-xl").size == 230 * MB
    assert merged.profile("default").static.core == ["sdxl-base", "sdxl-vae-fp16-fix"]
    assert merged.profile("flux") == catalog.profile("flux")
    # Importing the same file again changes nothing.
    again = merged.merge(imported)
    assert again.catalog == merged and not again.added and not again.changed
    assert again.unchanged == ("sdxl-base", "add-detail-xl", "pixel-art-xl")


def test_an_import_whose_profiles_name_ids_it_lacks_needs_the_catalogs_ids() -> None:
    text = "profiles:\n  default:\n    static:\n      core: [sdxl-base]\n"
    with pytest.raises(ConfigError, match="no catalog entry has the id 'sdxl-base'"):
        parse_catalog(text, source="import.yaml")
    catalog = load_catalog(EXAMPLE)
    merge = catalog.merge(parse_catalog(text, source="import.yaml", known_ids=catalog.ids))
    assert merge.profiles_changed == ("default",)
    assert merge.catalog.profile("default").static.warm == []


def test_an_import_clashing_with_an_existing_destination_is_refused_on_its_own_line() -> None:
    catalog = load_catalog(EXAMPLE)
    imported = parse_catalog(
        "entries:\n"
        "  - id: other-vae\n"
        "    kind: model\n"
        "    source: hf://madebyollin/sdxl-vae-fp16-fix/sdxl_vae.safetensors\n"
        "    destination: vae/\n"
        "    size: 335MB\n",
        source="import.yaml",
    )
    with pytest.raises(ConfigError) as info:
        catalog.merge(imported)
    assert str(info.value) == (
        "import.yaml: entries[0].destination: same destination as entry 'sdxl-vae-fp16-fix', "
        "already in the catalog: models/vae/sdxl_vae.safetensors; give one of them another "
        "destination (line 5)"
    )
