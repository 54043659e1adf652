"""Raw descriptors to ranked hits: the manifest, whitening, segments, published snapshots,
the one writer, the FAISS candidate structures, the native kernel and ranking; `Index` and
`ShardedIndex` put them together."""
