//! Live update of the driver process: the driver's end of the control protocol
//! (`molt-control`) and the state blob it exports.
//!
//! - [`driver`] is the driver's end: [`driver::serve_controlled`] for a driver that serves
//!   and can be prepared, [`driver::adopt_controlled`] for a successor that imports its
//!   predecessor's state and writes nothing to the ring until commit (or, when the
//!   ring's driver died, takes the ring over at once: crash recovery).
//!
//! `RING.md` ("Live update") describes what the driver does for each message.

pub mod driver;

use crate::persist::{DriverState, StateError, StateVersion};

/// A framed driver state as it travels between drivers (through the supervisor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBlob(Vec<u8>);

impl StateBlob {
    pub fn from_bytes(bytes: Vec<u8>) -> StateBlob {
        StateBlob(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The schema named in the frame header (not checked).
    pub fn schema(&self) -> Option<StateVersion> {
        DriverState::schema_of(&self.0)
    }

    /// The state checking phase, for a supervisor: decodes the blob in any schema this
    /// code knows and checks its invariants (nothing in flight, queue positions agree…).
    /// Whether the successor imports this schema is its own decision.
    pub fn check(&self) -> Result<DriverState, StateError> {
        DriverState::import_accepting(&self.0, &[StateVersion::V1, StateVersion::V2])
    }
}
