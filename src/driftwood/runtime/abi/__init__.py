"""Host ABIs a guest can import: ``driftwood`` (native) and ``wasi_ephemeral_nn`` (WasmEdge's)."""
