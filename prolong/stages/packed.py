"""``kind: packed``: MDS folders already packed to the training lengths, read in place.

This is how ProLong's own scripts train: from the released ``princeton-nlp/prolong-data-64K`` /
``prolong-data-512K`` / ``prolong-ultrachat-64K`` folders, one per domain, mixed as ``folder@0.3``.
Here a training stage with ``data_from`` naming a packed stage has a mixture of folder names under
its ``root`` (``{thestackv1_concat_by_repo-65536: 0.3, book-65536: 0.3, ...}``).

Its job reads no data in bulk: it checks each folder the readers use (columns and dtypes, sample
length = the reader's ``seq_len``, token ids below the vocabulary, SFT masks where an SFT stage
reads, the tokenizer fingerprint where the folder records one), pins ``hf://`` revisions to a
commit, and records each folder's index digest and sample count; training then streams the
shards from where they are (``copy: true`` copies them into the store first). Torch-free.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from prolong import checks, layout
from prolong.config.base import StageConfig
from prolong.config.data import check_storage_options
from prolong.errors import DataError
from prolong.fingerprint import tokenizer_fingerprint
from prolong.stages.data import StreamsStage

FOLDERS = "folders.json"  # in the stage's folder: what training reads, as the job checked it


class PackedStageConfig(StageConfig):
    kind: Literal["packed"] = "packed"
    root: str  # the folder holding the domain folders: a path, s3://BUCKET/..., hf://datasets/ORG/REPO[/PATH]
    revision: str | None = None  # hf:// roots: a commit, tag or branch (pinned to its commit by the job)
    storage_options: dict[str, Any] = {}  # fsspec options, e.g. {requester_pays: true}; never credentials
    # `copy: true`: copy the folders into the store (training then reads the store's copy)
    copy_into_store: bool = Field(default=False, alias="copy")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _no_credentials(self):
        check_storage_options(self.storage_options, "storage_options")
        return self


class PackedStage(StreamsStage):
    kind = "packed"
    config = PackedStageConfig
    entry = "prolong.data.packed:run_packed_stage"
    cfg: PackedStageConfig

    def folders(self) -> dict[str, list[str]]:
        """Folder (a mixture key) → the training stages that read it, in run order."""
        out: dict[str, list[str]] = {}
        for stage in self.readers():
            for key in self.recipe.train_stage(stage).mixture:
                out.setdefault(key, []).append(stage)
        return out

    def folder_uri(self, folder: str, revision: str | None = None) -> str:
        from prolong.data.remote import join, with_revision

        return with_revision(join(self.cfg.root, folder), revision or self.cfg.revision)

    def validate_mixture(self, train) -> None:
        for comp in train.cfg.components():
            if comp.doc_len is not None:
                raise ValueError(f"{train.name}.mixture.{comp.domain}@{comp.doc_len}: a packed folder is used as it "
                                 "was packed; name the folder only")

    def config_slice(self) -> dict:
        model = self.recipe.model
        needs = {s: {"seq_len": self.recipe.train_stage(s).seq_len, "mixture": self.recipe.train_stage(s).mixture,
                     "sft": self.recipe.graph.nodes[s].is_sft} for s in self.readers()}
        tokenizer = {"ref": model.tokenizer_path, **tokenizer_fingerprint(model.tokenizer_path, model.revision)}
        # storage options say how to reach the folders, not what they hold
        return {"stage": self.cfg.digest_dump(exclude={"storage_options"}), "tokenizer": tokenizer, "needs": needs}

    def check(self, ctx, reruns: set[str]) -> None:
        checks.check_tokenizer(self.recipe.model.tokenizer_path)
        for folder, readers in self.folders().items():
            checks.check_mds_folder(self.folder_uri(folder), self.cfg.storage_options,
                                    f"{readers[0]}.mixture.{folder} (under {self.name}.root)")

    # ------------------------------------------------------------ job side
    def _recorded(self, store, run: str) -> dict:
        return store.read_json(f"{layout.stage_prefix(run, self.name)}/{FOLDERS}")

    def stream_sources(self, store, run: str, train: str) -> list:
        from prolong.data.mds import StreamSource

        recorded = self._recorded(store, run)
        out = []
        for folder, proportion in self.recipe.train_stage(train).mixture.items():
            entry = recorded[folder]
            if entry.get("copied"):
                uri, options = store.uri(f"{layout.stage_prefix(run, self.name)}/{entry['copied']}"), None
            else:
                uri, options = entry["uri"], dict(self.cfg.storage_options)
            out.append(StreamSource(folder, uri, proportion, options, entry.get("validate_hash")))
        return out

    def stored_streams(self, train: str) -> str:
        return layout.stream("")

    def verify_streams(self, store, run: str, train: str) -> None:
        """Each folder's index is still the one this stage checked (released data can be re-uploaded
        under the same name); copies are checked file by file as for our own streams."""
        from prolong.data.remote import read_index
        from prolong.integrity import outputs_under, verify_outputs
        from prolong.manifest import read_manifest
        from prolong.stages.base import digest

        recorded = self._recorded(store, run)
        fix = f"re-run the {self.name} stage with --from-stage {self.name}"
        outputs = read_manifest(store, run, self.name).outputs if any(
            e.get("copied") for e in recorded.values()) else []
        for folder in self.recipe.train_stage(train).mixture:
            entry = recorded.get(folder)
            if entry is None:
                raise DataError(f"{train}: the {self.name} stage did not check folder {folder}; {fix}")
            if entry.get("copied"):
                verify_outputs(store, layout.stage_prefix(run, self.name), outputs_under(outputs, entry["copied"]),
                               content=store.is_local, error=DataError, fix=fix)
                continue
            raw, _ = read_index(entry["uri"], self.cfg.storage_options, what=f"{train}.mixture.{folder}")
            if digest(raw) != entry["index_sha256"]:
                raise DataError(f"{entry['uri']}/index.json changed since the {self.name} stage checked it; {fix}")

    def headline(self, metrics: dict) -> str:
        folders = metrics.get("folders", {})
        return (f"{len(folders)} folders, {metrics.get('samples', 0):,} samples "
                f"({'copied' if self.cfg.copy_into_store else 'read in place'})")
