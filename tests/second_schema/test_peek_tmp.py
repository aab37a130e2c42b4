import sys; sys.path.insert(0, "tests")
import test_second_schema as T
helpdesk = T.helpdesk
def test_peek(helpdesk):
    ctx, uris, created = helpdesk
    print(created[T.DRY])
    path, problems = T.dry_run(ctx, T.DRY, "legacy", "cell-1")
    print(path.read_text())
    with T.psycopg.connect(uris["legacy"]) as conn:
        plan = T.Planner(T.read_catalog(conn), T.load_dictionary(T.DOCS), conn).build(T.MOVED)
    for t, p in plan.tables.items():
        print(t, "|", p.where)
