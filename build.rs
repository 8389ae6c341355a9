//! Compiles `proto/` with protox: no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/keyhole/v1/keyhole.proto"];
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // These carry secret values: src/api/redact.rs writes their Debug.
        .skip_debug([
            "keyhole.v1.PutSecretRequest",
            "keyhole.v1.PutSecretRequest.source",
            "keyhole.v1.GetSecretResponse",
        ])
        .compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
