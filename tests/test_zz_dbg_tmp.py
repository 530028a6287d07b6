import json, time
from tests.repl_util import join, hdb_nodes
def test_dbg(node_factory):
    a = node_factory("node-a"); b = node_factory("node-b"); c = node_factory("node-c")
    join(a, b); join(b, c)
    time.sleep(4)
    for n in (a, b, c):
        st = n.call("cluster_status")
        print(n.name, [(c["name"], c["url"], [(s["database"], s["connected"], s["state"], s["last_error"]) for s in c["database_sockets"]]) for c in st["connections"]])
        print("  rows", [(r["name"], r.get("url")) for r in hdb_nodes(n)])
