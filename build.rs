//! Compiles proto/pubsub_api.proto into Rust with a pure-Rust protobuf compiler (protox), because the build
//! machines have no `protoc`. Both the client (the Pub/Sub source) and the server (the emulator) are generated.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/pubsub_api.proto");
    let descriptors = protox::compile(["pubsub_api.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
