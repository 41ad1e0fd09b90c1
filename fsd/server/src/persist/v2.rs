//! Schema 2 of the fsd state: schema 1's fields, then the FUSE connection's parameters
//! (what its INIT fixed besides the flags, and the transport), so that a successor
//! adopts the connection without a second INIT. The payload is [`FsdStateV2`] in bincode
//! (standard configuration). Frozen: these types and their encoding never change.

use serde::{Deserialize, Serialize};

use super::v1::FsdStateV1;
use super::{Connection, FsdState, Schema, StateError, StateVersion, Transport};

impl StateVersion {
    /// Schema 2: schema 1 and the connection's negotiated parameters.
    pub const V2: StateVersion = StateVersion(2);
}

pub(super) const SCHEMA: Schema = Schema {
    version: StateVersion::V2,
    encode,
    decode,
};

/// The connection's parameters; `transport` is 0 for `/dev/fuse`, 1 for io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ConnectionV2 {
    pub minor: u32,
    pub max_write: u32,
    pub max_readahead: u32,
    pub max_pages: u16,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub time_gran: u32,
    pub transport: u8,
}

/// Schema 2 of the fsd state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FsdStateV2 {
    pub base: FsdStateV1,
    pub connection: Option<ConnectionV2>,
}

impl From<&Connection> for ConnectionV2 {
    fn from(c: &Connection) -> ConnectionV2 {
        ConnectionV2 {
            minor: c.minor,
            max_write: c.max_write,
            max_readahead: c.max_readahead,
            max_pages: c.max_pages,
            max_background: c.max_background,
            congestion_threshold: c.congestion_threshold,
            time_gran: c.time_gran,
            transport: match c.transport {
                Transport::Dev => 0,
                Transport::Uring => 1,
            },
        }
    }
}

impl TryFrom<ConnectionV2> for Connection {
    type Error = StateError;
    fn try_from(c: ConnectionV2) -> Result<Connection, StateError> {
        Ok(Connection {
            minor: c.minor,
            max_write: c.max_write,
            max_readahead: c.max_readahead,
            max_pages: c.max_pages,
            max_background: c.max_background,
            congestion_threshold: c.congestion_threshold,
            time_gran: c.time_gran,
            transport: match c.transport {
                0 => Transport::Dev,
                1 => Transport::Uring,
                t => return Err(StateError::Corrupted(format!("transport {t}"))),
            },
        })
    }
}

fn encode(state: &FsdState) -> Result<Vec<u8>, StateError> {
    let v2 = FsdStateV2 {
        base: FsdStateV1::from(state),
        connection: state.connection.as_ref().map(ConnectionV2::from),
    };
    Ok(
        bincode::serde::encode_to_vec(&v2, bincode::config::standard())
            .expect("serializing to memory"),
    )
}

fn decode(payload: &[u8]) -> Result<FsdState, StateError> {
    let v2: FsdStateV2 = formats::frame::decode_serde("fsd state", payload)?;
    let connection = v2.connection.map(Connection::try_from).transpose()?;
    Ok(FsdState {
        connection,
        ..FsdState::try_from(v2.base)?
    })
}

/// The connection record's payload (record version 1): the INIT flags, then schema 2's
/// connection parameters.
pub(super) fn encode_record(flags: u64, c: &Connection) -> Vec<u8> {
    bincode::serde::encode_to_vec((flags, ConnectionV2::from(c)), bincode::config::standard())
        .expect("serializing to memory")
}

pub(super) fn decode_record(payload: &[u8]) -> Result<(u64, Connection), StateError> {
    let (flags, c): (u64, ConnectionV2) =
        formats::frame::decode_serde("connection record", payload)?;
    Ok((flags, Connection::try_from(c)?))
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::super::{check, export};
    use super::*;

    fn with_connection() -> FsdState {
        FsdState {
            connection: Some(Connection {
                minor: 44,
                max_write: 1 << 20,
                max_readahead: 128 << 10,
                max_pages: 256,
                max_background: 256,
                congestion_threshold: 192,
                time_gran: 1,
                transport: Transport::Uring,
            }),
            ..sample()
        }
    }

    #[test]
    fn the_connection_round_trips_and_schema_1_refuses_it() {
        let s = with_connection();
        assert_eq!(check(&export(&s, StateVersion::V2).unwrap()).unwrap(), s);
        assert!(matches!(
            export(&s, StateVersion::V1),
            Err(StateError::DoesNotFit { schema: 1, .. })
        ));
    }

    #[test]
    fn an_unknown_transport_is_corrupt() {
        let mut v2 = FsdStateV2 {
            base: FsdStateV1::from(&sample()),
            connection: None,
        };
        v2.connection = Some(ConnectionV2 {
            minor: 44,
            max_write: 4096,
            max_readahead: 0,
            max_pages: 1,
            max_background: 1,
            congestion_threshold: 1,
            time_gran: 1,
            transport: 9,
        });
        let payload = bincode::serde::encode_to_vec(&v2, bincode::config::standard()).unwrap();
        assert!(matches!(decode(&payload), Err(StateError::Corrupted(_))));
    }
}
