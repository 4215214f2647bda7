//! The protobuf codec of every creditd service: prost's, except that a
//! request that does not decode (wrong wire types, truncated fields,
//! invalid UTF-8 in a string) is INVALID_ARGUMENT naming the field, not
//! INTERNAL: the fault is the caller's, and nothing was touched.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use crate::error::{Error, Reason};

#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

#[derive(Debug, Clone)]
pub struct ProstDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| decode_error(&e).into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// INVALID_ARGUMENT (MALFORMED_REQUEST) naming the field prost failed on,
/// as a path from the request (`usage.items.meter`), or `request` when the
/// message itself is broken.
pub fn decode_error(e: &prost::DecodeError) -> Error {
    let (field, description) = field_of(&e.to_string());
    Error::invalid(field, Reason::MalformedRequest, format!("is not valid protobuf: {description}"))
}

/// Splits prost's "failed to decode Protobuf message: Inner.f: Outer.g:
/// what" into ("g.f", "what").
fn field_of(text: &str) -> (String, String) {
    let rest = text.strip_prefix("failed to decode Protobuf message: ").unwrap_or(text);
    let mut path = Vec::new();
    let mut rest = rest;
    while let Some((head, tail)) = rest.split_once(": ") {
        let Some((message, field)) = head.split_once('.') else { break };
        let ident = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ident(message) || !ident(field) {
            break;
        }
        path.push(field.to_string());
        rest = tail;
    }
    path.reverse();
    let field = if path.is_empty() { "request".to_string() } else { path.join(".") };
    (field, rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_field_prost_failed_on() {
        assert_eq!(
            field_of(
                "failed to decode Protobuf message: ReserveRequest.account_id: invalid wire type: Varint (expected LengthDelimited)"
            ),
            ("account_id".to_string(), "invalid wire type: Varint (expected LengthDelimited)".to_string())
        );
        assert_eq!(
            field_of(
                "failed to decode Protobuf message: UsageItem.meter: Usage.items: ReserveRequest.usage: invalid string value: data is not UTF-8 encoded"
            ),
            ("usage.items.meter".to_string(), "invalid string value: data is not UTF-8 encoded".to_string())
        );
        assert_eq!(
            field_of("failed to decode Protobuf message: invalid varint"),
            ("request".to_string(), "invalid varint".to_string())
        );
    }

    #[test]
    fn a_wrong_wire_type_is_invalid_argument() {
        // Field 1 (account_id, a string) sent as a varint.
        let bytes: &[u8] = &[0x08, 0x01];
        let e = crate::pb::ReserveRequest::decode(bytes).unwrap_err();
        let status = Status::from(decode_error(&e));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("account_id is not valid protobuf"), "{}", status.message());
    }
}
