"""Stage 4, search: vector indexes (`index`), index bundles and the query engine (`engine`), query-time logic (`query`),
near-duplicates (`dedup`)."""
