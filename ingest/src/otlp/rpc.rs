//! The few `google.rpc` messages OTLP uses to explain an error, hand-written with `prost`
//! (four small messages do not justify another dependency).
//!
//! * OTLP/HTTP error bodies are a `google.rpc.Status`, in the request's encoding.
//! * A retryable gRPC error carries a `google.rpc.RetryInfo`, both inside the status details and
//!   as the `google.rpc.retryinfo-bin` trailer that OpenTelemetry's Python exporter reads; the
//!   exporter then waits that long before it retries.

use std::time::Duration;

use prost::Message;

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, Message)]
pub struct ProtoAny {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// Type URL of [`RetryInfo`] inside an `Any`.
pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

impl RetryInfo {
    pub fn after(delay: Duration) -> RetryInfo {
        RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
            }),
        }
    }

    /// As an `Any`, for [`RpcStatus::details`].
    pub fn to_any(&self) -> ProtoAny {
        ProtoAny {
            type_url: RETRY_INFO_TYPE_URL.to_string(),
            value: self.encode_to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_info_round_trips_inside_a_status() {
        let status = RpcStatus {
            code: 8,
            message: "saturated".into(),
            details: vec![RetryInfo::after(Duration::from_millis(1500)).to_any()],
        };
        let decoded = RpcStatus::decode(status.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.details[0].type_url, RETRY_INFO_TYPE_URL);
        let retry = RetryInfo::decode(decoded.details[0].value.as_slice()).unwrap();
        assert_eq!(
            retry.retry_delay,
            Some(ProtoDuration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
    }
}
