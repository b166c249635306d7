"""Repo-relative names: reports, groups and links name shipped files the same way on every machine."""

from pathlib import Path

from esr_core.paths import ASSETS_DIR, REPO_ROOT, from_repo, portable_name, repo_relative


def test_a_path_inside_the_checkout_is_named_from_its_root_and_found_again():
    sae = ASSETS_DIR / "sae" / "smollm2-135m-instruct"
    assert repo_relative(sae) == "assets/sae/smollm2-135m-instruct"
    assert repo_relative(REPO_ROOT / "assets" / ".." / "assets" / "groups") == "assets/groups"
    assert from_repo("assets/sae/smollm2-135m-instruct") == sae.resolve()
    assert from_repo(repo_relative(sae)) == sae.resolve()


def test_a_path_outside_the_checkout_or_a_release_name_is_kept_as_given(tmp_path, monkeypatch):
    outside = tmp_path / "my-sae"
    assert repo_relative(outside) == str(outside) and from_repo(outside) == outside.resolve()
    monkeypatch.chdir(REPO_ROOT / "tests")  # a relative name is not re-rooted under the working folder
    assert repo_relative("gemma-scope-2b-pt-res:layer_12/width_16k") == "gemma-scope-2b-pt-res:layer_12/width_16k"
    assert repo_relative("../assets/groups") == "assets/groups"
    assert from_repo("~/x") == (Path.home() / "x").resolve()


def test_a_cache_path_is_named_from_the_home_folder_and_read_back():
    cached = Path.home() / ".cache" / "esr-lab" / "sae" / "L24"
    if REPO_ROOT.is_relative_to(Path.home()):  # a checkout under home keeps its repo-relative names
        assert portable_name(ASSETS_DIR / "groups") == "assets/groups"
    assert portable_name(cached) == "~/.cache/esr-lab/sae/L24"
    assert from_repo(portable_name(cached)) == cached.resolve()
    assert portable_name("/srv/sae/L24") == "/srv/sae/L24"
