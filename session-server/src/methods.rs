//! The gRPC methods this server serves, in one table read from the
//! services' encoded file descriptor sets (SessionStore's, health's and
//! reflection's), so no list of methods is kept by hand.
//!
//! Each layer looks a call's path up here once (`observe` for the metric
//! label and whether to wait for a stream's end, `auth` and `limits` for
//! health and streams) instead of keeping its own list. A method added to
//! a `.proto` is in the table the next build, with its label, and counted as
//! a stream if it streams.
//!
//! The table is built once per process, on first use (`server::run` asks for
//! it before serving), and then kept: it is a function of descriptor sets
//! compiled into the binary, so there is nothing to configure and nothing to
//! rebuild, and a `&'static` table costs the per-call clone of the service
//! stack a pointer copy, not a reference count. Its labels are then
//! `&'static str` too, as the metric and log labels want.

use std::sync::OnceLock;

use prost::Message as _;

/// The service whose calls are exempt from authentication and from the call
/// cap (probes must answer, to anyone, even when the server is overloaded).
const HEALTH_SERVICE: &str = tonic_health::pb::health_server::SERVICE_NAME;

/// The encoded descriptor sets of every service served.
const SERVED: [&[u8]; 4] = [
    sessionstore::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// The label of every path that is not a served method, so a caller probing
/// random paths cannot grow the metric label set.
pub const OTHER: &str = "other";

/// One entry of [`Methods`]: what the layers need to know of a call's method.
#[derive(Debug)]
pub struct Method {
    /// Position in the table; the same for every unknown path.
    index: usize,
    /// The full path, `/package.Service/Method`, or [`OTHER`].
    label: Box<str>,
    /// Whether the client or the server streams: the call lasts as long as
    /// its response body.
    streaming: bool,
    /// Whether it belongs to the health service.
    health: bool,
    /// Whether the path is not a served method.
    other: bool,
}

impl Method {
    /// Position in the table, below [`Methods::len`] for a served method and
    /// equal to it for any other path: an index for per-method arrays.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The method as a metric and log label: its full path, or [`OTHER`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the method streams (client or server side).
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// Whether the call is to the health service, served method or not.
    pub fn is_health(&self) -> bool {
        self.health
    }

    /// Whether the path is not a served method.
    pub fn is_other(&self) -> bool {
        self.other
    }
}

/// Every method served, by full path.
#[derive(Debug)]
pub struct Methods {
    /// The served methods, sorted by path; `Method::index` is the position.
    methods: Box<[Method]>,
    /// An open-addressing hash index over `methods`: positions, or
    /// [`EMPTY`]; a power of two long, at most a quarter full, so a lookup
    /// is one hash of two words and, nearly always, one comparison.
    slots: Box<[usize]>,
    /// What any other path resolves to.
    other: Method,
    /// What any other path under the health service resolves to: as before
    /// the table, such a path is exempt like health and answered
    /// UNIMPLEMENTED by the health service.
    other_health: Method,
}

/// An unused slot of [`Methods::slots`].
const EMPTY: usize = usize::MAX;

impl Methods {
    /// The methods of every service this server serves, built on the first
    /// call.
    ///
    /// # Errors
    ///
    /// [`prost::DecodeError`] when a compiled-in descriptor set does not
    /// decode (a build defect; `server::run` reports it before serving).
    pub fn served() -> Result<&'static Self, prost::DecodeError> {
        static SERVED_METHODS: OnceLock<Methods> = OnceLock::new();
        if let Some(methods) = SERVED_METHODS.get() {
            return Ok(methods);
        }
        // Two first callers may both build it; one table is kept.
        let methods = Self::from_sets(&SERVED)?;
        Ok(SERVED_METHODS.get_or_init(|| methods))
    }

    /// The methods of the services in the encoded `FileDescriptorSet`s
    /// given.
    ///
    /// # Errors
    ///
    /// [`prost::DecodeError`] when a set does not decode.
    pub fn from_sets(encoded_sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut found = Vec::new();
        for encoded in encoded_sets {
            let set = prost_types::FileDescriptorSet::decode(*encoded)?;
            for file in &set.file {
                for service in &file.service {
                    let service_name = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in &service.method {
                        found.push((
                            format!("/{service_name}/{}", method.name()),
                            method.client_streaming() || method.server_streaming(),
                            service_name == HEALTH_SERVICE,
                        ));
                    }
                }
            }
        }
        found.sort();
        found.dedup_by(|a, b| a.0 == b.0);
        let methods: Box<[Method]> = found
            .into_iter()
            .enumerate()
            .map(|(index, (path, streaming, health))| Method {
                index,
                label: path.into_boxed_str(),
                streaming,
                health,
                other: false,
            })
            .collect();
        let other = |health| Method {
            index: methods.len(),
            label: OTHER.into(),
            streaming: false,
            health,
            other: true,
        };
        let (other, other_health) = (other(false), other(true));
        // At most a quarter full: a probe rarely goes past its first slot.
        let mut slots = vec![EMPTY; (methods.len() * 4).next_power_of_two().max(4)];
        let mask = slots.len() - 1;
        for method in &methods {
            let mut slot = hash(method.label.as_bytes()) & mask;
            while slots[slot] != EMPTY {
                slot = (slot + 1) & mask;
            }
            slots[slot] = method.index;
        }
        Ok(Self {
            methods,
            slots: slots.into_boxed_slice(),
            other,
            other_health,
        })
    }

    /// The method a call's path names, or the entry for any other path.
    pub fn resolve(&self, path: &str) -> &Method {
        let mask = self.slots.len() - 1;
        let mut slot = hash(path.as_bytes()) & mask;
        loop {
            let index = self.slots[slot];
            if index == EMPTY {
                return self.other_of(path);
            }
            let method = &self.methods[index];
            if *method.label == *path {
                return method;
            }
            slot = (slot + 1) & mask;
        }
    }

    /// The entry of a path that is not a served method.
    #[cold]
    fn other_of(&self, path: &str) -> &Method {
        let health = path
            .strip_prefix('/')
            .and_then(|rest| rest.strip_prefix(HEALTH_SERVICE))
            .is_some_and(|rest| rest.starts_with('/'));
        if health {
            &self.other_health
        } else {
            &self.other
        }
    }

    /// How many methods are served; [`Method::index`] is below it for each,
    /// and equal to it for any other path.
    pub fn len(&self) -> usize {
        self.methods.len()
    }

    /// Whether no method is served.
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }

    /// Every served method, then the entry for any other path: one for each
    /// index.
    pub fn iter(&self) -> impl Iterator<Item = &Method> {
        self.methods.iter().chain(std::iter::once(&self.other))
    }
}

/// A cheap hash of a path: its length and its last 16 bytes, where gRPC
/// paths of one service differ (`…Store/GetSession`, `…Store/RevokeSession`),
/// read as two fixed-size words. Not meant to resist anyone: an unknown path
/// costs at most a probe over the few occupied slots around its hash,
/// whatever it hashes to.
fn hash(path: &[u8]) -> usize {
    let (last, before) = match path.split_last_chunk::<8>() {
        Some((rest, last)) => (
            u64::from_le_bytes(*last),
            rest.last_chunk::<8>()
                .map_or(0, |word| u64::from_le_bytes(*word)),
        ),
        // Shorter than any path a client sends.
        None => {
            let mut bytes = [0u8; 8];
            bytes[..path.len()].copy_from_slice(path);
            (u64::from_le_bytes(bytes), 0)
        }
    };
    let mixed =
        (last ^ before.rotate_left(29) ^ path.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // The high bits are the well-mixed ones; usize is at least 32 bits on
    // every target tokio supports.
    (mixed >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the served services is in the table with its own
    /// label, its streaming and health flags as the descriptors say, and
    /// any other path is `other`.
    #[test]
    fn the_served_methods_come_from_the_descriptors() {
        let methods = Methods::served().unwrap();
        let get = methods.resolve("/sessionstore.v1.SessionStore/GetSession");
        assert_eq!(get.label(), "/sessionstore.v1.SessionStore/GetSession");
        assert!(!get.is_streaming() && !get.is_health() && !get.is_other());
        let watch = methods.resolve("/sessionstore.v1.SessionStore/WatchRevocations");
        assert!(watch.is_streaming() && !watch.is_health());
        let health_watch = methods.resolve("/grpc.health.v1.Health/Watch");
        assert!(health_watch.is_streaming() && health_watch.is_health());
        let check = methods.resolve("/grpc.health.v1.Health/Check");
        assert!(!check.is_streaming() && check.is_health());
        for reflection in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let method = methods.resolve(reflection);
            assert_eq!(method.label(), reflection);
            assert!(method.is_streaming() && !method.is_health());
        }
        let streaming: Vec<&str> = methods
            .iter()
            .filter(|m| m.is_streaming())
            .map(Method::label)
            .collect();
        assert_eq!(
            streaming,
            [
                "/grpc.health.v1.Health/Watch",
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "/sessionstore.v1.SessionStore/WatchRevocations",
            ]
        );
        let probe = methods.resolve("/evil/../path");
        assert_eq!((probe.index(), probe.label()), (methods.len(), OTHER));
        assert!(probe.is_other() && !probe.is_health() && !probe.is_streaming());
    }

    /// Each served method resolves to itself, at its own index.
    #[test]
    fn every_served_method_resolves_to_its_entry() {
        let methods = Methods::served().unwrap();
        for (index, method) in methods.iter().enumerate() {
            assert_eq!(method.index(), index);
            if !method.is_other() {
                assert!(std::ptr::eq(methods.resolve(method.label()), method));
            }
        }
        assert_eq!(methods.iter().count(), methods.len() + 1);
    }

    /// A path under the health service that is no method of it is `other`
    /// but still health (exempt like health, answered UNIMPLEMENTED by it);
    /// a service whose name only starts like health's is not health.
    #[test]
    fn unknown_health_paths_stay_health() {
        let methods = Methods::served().unwrap();
        let unknown = methods.resolve("/grpc.health.v1.Health/Nope");
        assert!(unknown.is_other() && unknown.is_health());
        for path in [
            "/grpc.health.v1.HealthX/Check",
            "/grpc.health.v1.Health",
            "",
            "/",
        ] {
            let method = methods.resolve(path);
            assert!(method.is_other() && !method.is_health(), "{path}");
        }
    }

    /// Paths of every length, short ones included, and paths that share
    /// their last bytes, resolve exactly.
    #[test]
    fn lookups_are_exact_whatever_the_hash() {
        use prost_types::{
            FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto,
        };
        let method = |name: &str| MethodDescriptorProto {
            name: Some(name.into()),
            ..Default::default()
        };
        let set = FileDescriptorSet {
            file: vec![FileDescriptorProto {
                package: Some("p".into()),
                service: vec![
                    ServiceDescriptorProto {
                        name: Some("S".into()),
                        method: (0..40)
                            .map(|i| method(&format!("{i}Session")))
                            .chain([method("A"), method("B")])
                            .collect(),
                        ..Default::default()
                    },
                    ServiceDescriptorProto {
                        name: Some("T".into()),
                        method: vec![method("A")],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        };
        let methods = Methods::from_sets(&[&set.encode_to_vec()]).unwrap();
        assert_eq!(methods.len(), 43);
        for method in methods.iter().filter(|m| !m.is_other()) {
            assert!(std::ptr::eq(methods.resolve(method.label()), method));
        }
        for path in [
            "/p.S/C",
            "/p.S/",
            "/p.S/0Sessio",
            "/p.S/40Session",
            "/p.U/A",
        ] {
            assert!(methods.resolve(path).is_other(), "{path}");
        }
    }
}
