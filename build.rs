//! Compiles `proto/creditd/v1/*.proto` into Rust (client and server) and a
//! descriptor set for gRPC server reflection. protoc comes vendored, so a
//! fresh machine needs nothing installed.

use std::{env, io, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/creditd/v1/common.proto",
    "proto/creditd/v1/credit.proto",
    "proto/creditd/v1/admin.proto",
    "proto/creditd/v1/pricing.proto",
    "proto/creditd/v1/reports.proto",
    "proto/creditd/v1/alerts.proto",
];

fn main() -> io::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(io::Error::other)?;
    let well_known = protoc_bin_vendored::include_path().map_err(io::Error::other)?;
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);

    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    let includes = [PathBuf::from("proto"), well_known];
    tonic_prost_build::configure()
        // prost's codec, with decode errors answered INVALID_ARGUMENT.
        .codec_path("crate::grpc::codec::Codec")
        .file_descriptor_set_path(out_dir.join("creditd_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
