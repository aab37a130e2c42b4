"""The dry run's non-database part (mover.dry_run -> storage.estimate): per data type (repositories, objects per
type, container images) the organization's items and bytes on the source, checked against counts made here with
SQL and the stores' own answers; a time extrapolated from a sample measured during the dry run; nothing changed
on either cell (real cells, stores and registries; no mocks)."""

from __future__ import annotations

import os
import re

import psycopg

from orgmover import mover, objects, registry
from orgmover.errors import ConfigError
from orgmover.report import fmt_bytes
from orgmover.storage import _fit, estimate

ROW = re.compile(r"^(repository|object: \w+|container_repository)\s+([\d,]+)\s+([\d.]+ [KMGT]?i?B)\s+(\S+)\s+"
                 r"(\d+) \(.*?\) in ([\d.]+)s\s+.*\s+x([\d.]+)\s+([\d.]+)s$")


def _storage_state(cell) -> dict:
    """Everything a cell's storage holds: files of its Git storages, keys of its buckets, its registry's tags."""
    st = cell.storage
    files = sorted(os.path.join(d, f) for root in st.git_storages.values() for d, _, fs in os.walk(root) for f in fs)
    keys = {t: sorted((i.key, i.etag) for i in st.store(t).list()) for t in st.object_stores}
    reg = st.registry()
    tags = {r: sorted(reg.tags(r)) for r in reg.catalog()}
    return {"files": files, "keys": keys, "tags": tags}


def test_dry_run_lists_each_data_type_with_an_estimate_from_a_measured_sample(devenv, seeded, ctx):
    org = seeded["gamma"]
    src, dst = devenv.resolve_cell("legacy"), devenv.resolve_cell("cell-1")
    before = (_storage_state(src), _storage_state(dst))
    path, problems = mover.dry_run(ctx, org.id, "legacy", "cell-1")
    assert (_storage_state(src), _storage_state(dst)) == before  # nothing written, not even a sample
    assert ctx.tracking.latest_for_org(org.id) is None
    text = path.read_text()
    rows = {m.group(1): m for m in (ROW.match(line) for line in text.splitlines()) if m}
    assert set(rows) == {"repository", "object: uploads", "object: lfs", "object: artifacts", "object: packages",
                         "container_repository"}, text

    # counts and bytes, independently
    with psycopg.connect(src.dsn) as c:
        projects = c.execute("SELECT count(*) FROM project_repositories r JOIN projects p ON p.id = r.project_id "
                             "WHERE p.organization_id = %s", (org.id,)).fetchone()[0]
        oids = [r[0] for r in c.execute(
            "SELECT DISTINCT l.oid FROM lfs_objects l JOIN lfs_objects_projects a ON a.lfs_object_id = l.id "
            "JOIN projects p ON p.id = a.project_id WHERE p.organization_id = %s", (org.id,))]
        artifacts = c.execute("SELECT count(*) FROM p_ci_job_artifacts a JOIN projects p ON p.id = a.project_id "
                              "WHERE p.organization_id = %s", (org.id,)).fetchone()[0]
        packages = c.execute("SELECT count(*) FROM packages_package_files f JOIN packages_packages k ON k.id = f.package_id "
                             "JOIN projects p ON p.id = k.project_id WHERE p.organization_id = %s", (org.id,)).fetchone()[0]
        names = c.execute("SELECT r.path, cr.name FROM container_repositories cr JOIN projects p ON p.id = cr.project_id "
                          "JOIN routes r ON r.source_type = 'Project' AND r.source_id = p.id WHERE p.organization_id = %s",
                          (org.id,)).fetchall()
    images = []
    for path, name in names:
        try:
            images.append(registry.container_repository_path(path, name))
        except ConfigError:  # a name no registry accepts holds no image
            pass
    lfs = src.storage.store("lfs")
    lfs_bytes = sum(lfs.head(objects.lfs_path(o)).size for o in oids)
    assert (int(rows["object: lfs"].group(2).replace(",", "")), rows["object: lfs"].group(3)) == (len(oids), fmt_bytes(lfs_bytes))
    assert int(rows["object: artifacts"].group(2).replace(",", "")) == artifacts > 0
    assert int(rows["object: packages"].group(2).replace(",", "")) == packages > 0
    assert f"{projects} project" in text and int(rows["repository"].group(2).replace(",", "")) >= projects > 0
    tags = sum(len(src.storage.registry().tags(i)) for i in images)
    assert int(rows["container_repository"].group(2)) == len(images) and f"{tags} tags" in text
    assert all(r.group(4) == "-" for r in rows.values())  # nothing missing on the source

    # the estimate: extrapolated from a sample measured now (times differ from one dry run to the next)
    total = 0.0
    for name, r in rows.items():
        assert int(r.group(5)) == min(4, int(r.group(2).replace(",", ""))) and float(r.group(6)) > 0, name
        total += float(r.group(8))
    m = re.search(r"Estimated first replication: ([\d.]+)s one item after the other", text)
    assert m and abs(float(m.group(1)) - total) <= 0.1 * len(rows), text
    with psycopg.connect(src.dsn) as c:
        kinds = estimate(c, mover.run_checks(ctx, org.id, "legacy", "cell-1").plan, src.storage, dst.storage)
    for k in kinds:
        assert k.samples and all(t > 0 for _, t in k.samples), k.name
        a, b = _fit(k.samples)
        assert abs(k.seconds - k.factor * (a * k.items + b * k.bytes)) < 1e-9, k.name
        assert k.seconds > 0
