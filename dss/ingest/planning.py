"""Which image becomes which row: the input's listing and CSVs -> one plan per split.

    plan = plan_dataset(source, Layout())   # lists the input once, reads the CSVs

A split's ids come from its CSV (``train_labels.csv`` for train, ``test_features.csv`` for test);
the image of an id is its ``filepath`` (relative to the input root), else ``<dir>/<id>.<ext>``.
Without CSVs the file names are the ids and every image is a test image. Anything that cannot be
used is decided here, before any download, and recorded as a skip with its key and reason. Items
are sorted by id, so the rows of a split never depend on listing or CSV order. Also here: the
run's ``PreprocessSettings`` (built once from the command line) and ``PreprocessError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from dss import cli, images
from dss.ingest import labels, records, sources
from dss.ingest.sources import id_from_key

BUCKET_EXAMPLE = "s3://animal-classification-dss-works/data/"
EXAMPLES = 20  # keys quoted per note in the summary


class PreprocessError(RuntimeError):
    """The run cannot produce a usable dataset; the message says why and what to do."""


def usage_hint() -> str:
    return ("Run it on the team's bucket or on a local copy in the same layout:\n"
            f"  python preprocess.py --input {BUCKET_EXAMPLE} --output-dir ./output\n"
            "  python preprocess.py --input ./data --output-dir ./output")


@dataclass(frozen=True)
class Layout:
    """Names inside the input root (the --train-labels ... --test-dir flags)."""

    train_labels: str = "train_labels.csv"
    train_features: str = "train_features.csv"
    test_features: str = "test_features.csv"
    train_dir: str = "train_features"
    test_dir: str = "test_features"

    @property
    def csv_names(self) -> tuple[str, str, str]:
        return (self.train_labels, self.train_features, self.test_features)


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything one preprocess run is asked to do, besides where it reads and writes."""

    input_uri: str              # as given on the command line; recorded in the pickles and summaries
    image_size: int             # stored square side, px
    policy: str = "squash"      # resize policy, one of images.RESIZE_POLICIES
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    workers: int = 1            # decode processes; 1 decodes in this process
    download_threads: int = sources.DEFAULT_DOWNLOAD_THREADS
    limit: int | None = None    # first N ids per split, before sharding
    shard_index: int = 0
    num_shards: int = 1
    quiet: bool = False         # no progress bars (log lines follow the dss logger's switch)
    layout: Layout = Layout()
    # --input is this instance's share of a ShardedByS3Key input: nothing is sliced again.
    presharded: bool = False
    # The data set's name in the output's record (None: --input, resolved); a ShardedByS3Key input's S3 URI.
    dataset_uri: str | None = None
    overwrite: bool = False     # the output may hold another data set's files: replace them


@dataclass
class Item:
    """One image to fetch. ``label`` is a class index or -1 (test); ``csv_row`` the 0-based data row
    of the id in its features (test) / labels (train) CSV, or -1 when there is no CSV."""

    id: str
    key: str
    size: int  # bytes, from the listing
    site: str = ""
    label: int = -1
    csv_row: int = -1


@dataclass
class SplitPlan:
    name: str
    source: str                                        # where the images come from, for logs
    items: list[Item] = field(default_factory=list)    # sorted by id
    skipped: list[dict] = field(default_factory=list)  # decided before any download
    has_labels: bool = False
    has_csv_rows: bool = False
    notes: dict = field(default_factory=dict)          # counts for the summary (deterministic)
    warnings: list[str] = field(default_factory=list)
    # The input holds only this instance's share of the images (a ShardedByS3Key input): nothing is
    # sliced again, and CSV ids whose image is elsewhere are counted here, not skipped (not listed).
    presharded: bool = False
    in_other_shards: int = 0

    @property
    def listed(self) -> int:
        return len(self.items) + len(self.skipped)


@dataclass
class Plan:
    splits: list[SplitPlan]
    class_names: list[str]
    csv_problems: list[dict]
    warnings: list[str]
    mode: str  # "csv" or "images_only"
    label_of: dict[str, int] | None = None  # the labels CSV, id -> class index (train)
    leakage: dict = field(default_factory=dict)  # filled after the splits are built (dss.ingest.reporting.add_leakage)


class Listing:
    """Every object under the input root, listed once: ``infos`` in key order, ``by_key`` by key."""

    def __init__(self, infos: list[sources.ObjectInfo]):
        self.infos = infos
        self.by_key = {info.key: info for info in infos}


def _normalise_filepath(filepath: str) -> str:
    return filepath.strip().replace("\\", "/").removeprefix("./").lstrip("/")


def _stem_index(infos: list[sources.ObjectInfo], folder: str) -> tuple[dict[str, list[sources.ObjectInfo]], list[str]]:
    """Objects directly inside ``folder``, grouped by id; plus the keys that are not image candidates."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    by_id: dict[str, list[sources.ObjectInfo]] = {}
    ignored = []
    for info in infos:
        if not info.key.startswith(prefix) or "/" in info.key[len(prefix):]:
            continue
        image_id = id_from_key(info.key)
        if image_id is None:
            ignored.append(info.key)
        else:
            by_id.setdefault(image_id, []).append(info)
    return by_id, ignored


def plan_from_stems(name: str, infos: list[sources.ObjectInfo], source_text: str) -> SplitPlan:
    """A test split from image files alone: ids are the file stems, site "" (no CSV).

    Two keys whose ids match ignoring case (``a.jpg``, ``A.JPG``, ``x/a.png``) are a conflict: the
    first key in sorted order is used, the others are skipped as ``duplicate_id``."""
    plan = SplitPlan(name=name, source=source_text)
    first_by_folded: dict[str, sources.ObjectInfo] = {}
    ignored = []
    for info in infos:  # sorted by key
        image_id = id_from_key(info.key)
        if image_id is None:
            ignored.append(info.key)
            continue
        folded = image_id.casefold()
        kept = first_by_folded.get(folded)
        if kept is not None:
            plan.skipped.append(records.skip_entry(info.key, image_id, "duplicate_id",
                                           f"id '{image_id}' (ignoring case) is already taken by {kept.key}"))
            continue
        first_by_folded[folded] = info
        plan.items.append(Item(id=image_id, key=info.key, size=info.size))
    if ignored:
        plan.notes["ignored_keys"] = {"count": len(ignored), "examples": ignored[:EXAMPLES]}
        plan.warnings.append(f"{len(ignored)} object(s) without a .jpg/.jpeg/.png/no extension ignored, "
                             f"e.g. {ignored[:3]}")
    return plan


def _resolve(image_id: str, filepath: str | None, keys: dict[str, sources.ObjectInfo],
             fallback: dict[str, list[sources.ObjectInfo]], folder: str) -> tuple[sources.ObjectInfo | None, str]:
    """The object for an id: its CSV filepath, else ``<folder>/<id>.<ext>``; plus the key tried."""
    if filepath:
        wanted = _normalise_filepath(filepath)
        if wanted in keys:
            return keys[wanted], wanted
    candidates = fallback.get(image_id, [])
    tried = _normalise_filepath(filepath) if filepath else f"{folder.strip('/')}/{image_id}.jpg"
    return (candidates[0] if candidates else None), tried


def _match_ids(plan: SplitPlan, ids: list[str], label_of: dict[str, int] | None, features,
               keys: dict[str, sources.ObjectInfo], fallback: dict[str, list[sources.ObjectInfo]],
               folder: str) -> tuple[dict[str, str], int]:
    """Give each CSV id its object (appending to ``plan.items`` / ``plan.skipped``); returns the
    used keys (key -> id) and how many ids have no row in ``features``."""
    feature_row = {}
    if features is not None:
        for row, image_id in enumerate(features.ids):
            feature_row[image_id] = (row, features.filepaths[row], features.sites[row])
    used_keys: dict[str, str] = {}
    without_features = 0
    for row, image_id in enumerate(ids):
        filepath, site = None, ""
        if image_id in feature_row:
            feature_index, filepath, site = feature_row[image_id]
            if label_of is None:  # test: the row is the features CSV's, which test_predictions.csv follows
                row = feature_index
        elif features is not None:
            without_features += 1
        info, tried = _resolve(image_id, filepath, keys, fallback, folder)
        if info is None and plan.presharded:
            plan.in_other_shards += 1
            continue
        if info is None:
            plan.skipped.append(records.skip_entry(tried, image_id, "missing_object",
                                           f"no object for id '{image_id}' (looked for {tried} and {folder}/{image_id}.*)",
                                           csv_row=row, site=site or ""))
            continue
        if info.key in used_keys:
            plan.skipped.append(records.skip_entry(info.key, image_id, "shared_object",
                                           f"object {info.key} already used for id '{used_keys[info.key]}'",
                                           csv_row=row, site=site or ""))
            continue
        used_keys[info.key] = image_id
        label = label_of[image_id] if label_of is not None else -1
        plan.items.append(Item(id=image_id, key=info.key, size=info.size, site=site or "", label=label, csv_row=row))
    return used_keys, without_features


def _note_unreferenced(plan: SplitPlan, unreferenced: list[str], rejected: dict[str, str], folder: str) -> None:
    """Objects in ``folder`` no id refers to: those of rejected CSV rows (``rejected``) apart from the rest."""
    of_rejected = [key for key in unreferenced if id_from_key(key) in rejected]
    without_row = [key for key in unreferenced if id_from_key(key) not in rejected]
    plan.notes["unreferenced_objects"] = {"count": len(unreferenced), "examples": unreferenced[:EXAMPLES]}
    if of_rejected:
        plan.notes["objects_of_rejected_rows"] = len(of_rejected)
        examples = "; ".join(f"{key} ({rejected[id_from_key(key)]})" for key in of_rejected[:3])
        plan.warnings.append(f"{len(of_rejected)} object(s) in {folder}/ are the images of rejected CSV rows "
                             f"(not used; see 'CSV rows rejected'), e.g. {examples}")
    if without_row:
        plan.warnings.append(f"{len(without_row)} object(s) in {folder}/ have no row in the CSV "
                             f"(not used), e.g. {without_row[:3]}")


def plan_from_csv(name: str, label_of: dict[str, int] | None, features, listing: Listing, folder: str,
                  source_text: str, presharded: bool = False, rejected: dict[str, str] | None = None) -> SplitPlan:
    """A split whose ids come from a CSV: ``label_of``'s (train, CSV order), else ``features``' (test).

    Ids without an object are skipped as ``missing_object``, unless ``presharded``: then the
    input is one instance's share of a ShardedByS3Key input and such ids are counted as
    ``in_other_shards`` (their image went to another instance). Objects in ``folder`` no id refers
    to are counted under ``notes.unreferenced_objects``; those of ``rejected`` rows (id -> "file
    line N: reason") are named as such. Two ids on one object: the later is ``shared_object``."""
    ids = list(label_of) if label_of is not None else list(features.ids)
    plan = SplitPlan(name=name, source=source_text, has_labels=label_of is not None, has_csv_rows=True,
                     presharded=presharded)
    fallback, ignored = _stem_index(listing.infos, folder)
    for image_id, candidates in sorted(fallback.items()):
        if len(candidates) > 1:
            plan.warnings.append(f"id '{image_id}' has {len(candidates)} files in {folder}/: "
                                 f"{[c.key for c in candidates]}; using {candidates[0].key} when no filepath says")
    used_keys, without_features = _match_ids(plan, ids, label_of, features, listing.by_key, fallback, folder)
    plan.items.sort(key=lambda item: item.id)
    plan.skipped.sort(key=lambda entry: entry["id"])
    unreferenced = sorted(c.key for group in fallback.values() for c in group if c.key not in used_keys)
    plan.notes["ids_without_object"] = sum(1 for s in plan.skipped if s["reason"] == "missing_object")
    _note_unreferenced(plan, unreferenced, rejected or {}, folder)
    if plan.notes["ids_without_object"]:
        plan.warnings.append(f"{plan.notes['ids_without_object']} id(s) in the CSV have no image object")
    if features is not None:
        plan.notes["ids_without_features_row"] = without_features
        if without_features:
            plan.warnings.append(f"{without_features} labelled id(s) have no row in the features CSV (site unknown)")
    if ignored:
        plan.notes["ignored_keys"] = {"count": len(ignored), "examples": ignored[:EXAMPLES]}
    return plan


def _read_csv_table(source: sources.Source, key: str, reader, plan: Plan):
    """Run a dss.ingest.labels reader on a CSV of the source (messages name its full location); its
    rejected rows and warnings go to ``plan``."""
    try:
        data = source.read(key)
    except sources.ObjectSkip as skip:
        raise PreprocessError(f"cannot read the CSV: {skip}") from None
    table = reader(source.describe(key), data=data)
    if table.problems:  # on the console too, before any download: a bad row is seen, not found in a file later
        cli.log.info(labels.rejected_rows_report(table.problems))
    for problem in table.problems:
        plan.csv_problems.append({"file": str(problem.file), "line": problem.line, "id": problem.id,
                                  "reason": problem.reason})
    plan.warnings.extend(str(warning) for warning in table.warnings)
    return table


def nested_dataset_folders(infos: list[sources.ObjectInfo], layout: Layout) -> dict[str, list[str]]:
    """Subfolders that hold one of the layout's CSVs: {folder: [CSV names]}, folders sorted."""
    found: dict[str, list[str]] = {}
    for info in infos:
        path = PurePosixPath(info.key)
        if path.name in layout.csv_names and len(path.parts) > 1:
            found.setdefault(str(path.parent), []).append(path.name)
    return dict(sorted(found.items()))


def plan_dataset(source: sources.Source, layout: Layout, csv_source: sources.Source | None = None,
                 presharded: bool = False) -> Plan:
    """List the input once and decide, per split, which id comes from which object.

    ``csv_source``: where the CSVs are (--csv-dir; default the input itself; their ``filepath``
    column stays relative to the input). ``presharded``: the input is this instance's share of a
    ShardedByS3Key input, so every image in it is processed (no slicing later) and CSV ids whose
    image is not in it are counted as ``in_other_shards`` instead of skipped."""
    cli.log.info(f"Listing {source.describe()} ...")
    listing = Listing(source.list(""))
    cli.log.info(f"Found {len(listing.infos)} objects")
    csv_source, csv_keys = _find_csvs(source, listing, layout, csv_source, presharded)
    if not any(name in csv_keys for name in layout.csv_names):
        return _plan_images_only(source, listing, layout, presharded)
    if layout.train_features in csv_keys and layout.train_labels not in csv_keys:
        raise PreprocessError(f"{csv_source.describe(layout.train_features)} exists but {layout.train_labels} does "
                              "not; pass --train-labels NAME if the labels file has another name")
    plan = Plan([], [], [], [], "csv")
    if layout.train_labels in csv_keys:
        plan.splits.append(_plan_train(plan, source, csv_source, csv_keys, listing, layout, presharded))
    if layout.test_features in csv_keys:
        features = _read_csv_table(csv_source, layout.test_features, labels.read_features, plan)
        plan.splits.append(plan_from_csv("test", None, features, listing, layout.test_dir, source.describe(
            layout.test_dir + "/"), presharded, labels.rejected_by_id(features.problems)))
        return plan
    test_infos = [info for info in listing.infos if info.key.startswith(layout.test_dir.strip("/") + "/")]
    if test_infos:
        cli.log.info(f"No {layout.test_features}: test ids from the file names in {layout.test_dir}/")
        plan.splits.append(plan_from_stems("test", test_infos, source.describe(layout.test_dir + "/")))
        plan.splits[-1].presharded = presharded
    return plan


def _find_csvs(source: sources.Source, listing: Listing, layout: Layout, csv_source: sources.Source | None,
               presharded: bool) -> tuple[sources.Source, set[str]]:
    """Where the CSVs are read from, and which names exist there."""
    if csv_source is None:
        if presharded:
            _refuse_sharded_csvs(source, listing.by_key, layout)
        return source, set(listing.by_key)
    csv_keys = {name for name in layout.csv_names if csv_source.exists(name)}
    if not csv_keys:
        raise PreprocessError(f"--csv-dir {csv_source.describe()} has none of {', '.join(layout.csv_names)}. "
                              "Nothing was written.")
    return csv_source, csv_keys


def _plan_images_only(source: sources.Source, listing: Listing, layout: Layout, presharded: bool) -> Plan:
    """No CSVs: every image is a test image, its id the file name. Refuses a dataset one level down."""
    nested = nested_dataset_folders(listing.infos, layout)
    if nested:
        # A dataset one level down (./data/demo/train_labels.csv): images-only mode would take its
        # train images as unlabelled TEST images and replace the outputs of a real run.
        folder, names = next(iter(nested.items()))
        location = source.describe(folder + "/")
        others = [source.describe(other + "/") for other in list(nested)[1:]]
        raise PreprocessError(
            f"{source.describe()} has no {layout.train_labels} or {layout.test_features} at its top level, "
            f"but {location} has {', '.join(sorted(names))}: the dataset is in that subfolder. Run with "
            f"--input {location}" + (f" (other dataset folders: {', '.join(others[:5])})" if others else "")
            + ". Nothing was written.")
    images_only = [info for info in listing.infos if id_from_key(info.key) is not None]
    if not images_only:
        raise PreprocessError(f"nothing usable in {source.describe()}: no {layout.train_labels}, "
                              f"{layout.test_features} or .jpg/.jpeg/.png objects.\n{usage_hint()}")
    cli.log.info(f"No CSVs in {source.describe()}: treating all {len(images_only)} images as TEST images")
    split_plan = plan_from_stems("test", listing.infos, source.describe())
    split_plan.presharded = presharded
    return Plan([split_plan], [], [], [], "images_only")


def _plan_train(plan: Plan, source: sources.Source, csv_source: sources.Source, csv_keys: set[str],
                listing: Listing, layout: Layout, presharded: bool) -> SplitPlan:
    """The train split from the labels CSV (and the train features CSV when there is one); sets
    ``plan.class_names`` and ``plan.label_of``."""
    table = _read_csv_table(csv_source, layout.train_labels, labels.read_labels, plan)
    plan.class_names = list(table.class_names)
    plan.label_of = label_of = {image_id: int(label) for image_id, label in zip(table.ids, table.labels)}
    cli.log.info(f"Labels loaded: {len(table.ids)} rows, {len(table.problems)} rejected")
    cli.log.info(f"Classes ({len(plan.class_names)}, from {layout.train_labels} {table.classes_from}): "
                 + ", ".join(plan.class_names))
    features, unlabelled = None, []
    if layout.train_features in csv_keys:
        features = _read_csv_table(csv_source, layout.train_features, labels.read_features, plan)
        unlabelled = [image_id for image_id in features.ids if image_id not in label_of]
        if unlabelled:
            plan.warnings.append(f"{len(unlabelled)} id(s) in {layout.train_features} have no label "
                                 f"(not used), e.g. {unlabelled[:3]}")
    split_plan = plan_from_csv("train", label_of, features, listing, layout.train_dir, source.describe(
        layout.train_dir + "/"), presharded, labels.rejected_by_id(table.problems))
    if features is not None:
        split_plan.notes["features_rows_without_label"] = len(unlabelled)
    return split_plan


def _refuse_sharded_csvs(source: sources.Source, keys: dict, layout: Layout) -> None:
    """A ShardedByS3Key input in the dataset layout needs its CSVs from elsewhere: SageMaker hands
    each CSV object to one instance only, so reading them from the input would be wrong everywhere."""
    found = [name for name in layout.csv_names if name in keys]
    folders = [folder for folder in (layout.train_dir, layout.test_dir)
               if any(key.startswith(folder.strip("/") + "/") for key in keys)]
    if not found and not folders:
        return  # a flat folder of images: test images from the file names, no CSVs needed
    what = f"has {', '.join(found)}" if found else f"has {', '.join(f + '/' for f in folders)} but no CSVs"
    raise PreprocessError(
        f"{source.describe()} is a ShardedByS3Key input of this SageMaker Processing job and {what}: each "
        "instance gets only some objects of a sharded input, so a CSV in it reaches one instance only. Give "
        f"the CSVs ({', '.join(layout.csv_names)}) as a separate ProcessingInput with "
        "s3_data_distribution_type='FullyReplicated' and pass its destination as --csv-dir "
        "(e.g. --csv-dir /opt/ml/processing/csv). Nothing was written.")
