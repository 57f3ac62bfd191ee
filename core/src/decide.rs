//! Same instance, new instance, or clone: the decision that keeps nixseed from doing what
//! users hate about cloud-init (regenerating host keys on every config change).

use crate::manifest::Manifest;

/// What to do when a DMI product_uuid changed under an unchanged seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClonePolicy {
    /// New machine-id and host keys (default): two VMs must never share them.
    #[default]
    Regenerate,
    /// Keep everything and record the new product_uuid.
    Adopt,
    /// Apply nothing; the unit fails so the operator looks.
    Refuse,
}

impl ClonePolicy {
    const ALL: [ClonePolicy; 3] = [
        ClonePolicy::Regenerate,
        ClonePolicy::Adopt,
        ClonePolicy::Refuse,
    ];

    /// The policy's name on a command line.
    pub fn name(self) -> &'static str {
        match self {
            ClonePolicy::Regenerate => "regenerate",
            ClonePolicy::Adopt => "adopt",
            ClonePolicy::Refuse => "refuse",
        }
    }
}

impl std::str::FromStr for ClonePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ClonePolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown clone policy '{s}' (regenerate, adopt or refuse)"))
    }
}

/// The identifying facts of a seed that was found.
#[derive(Debug, Clone, Copy)]
pub struct SeedSummary<'a> {
    pub instance_id: &'a str,
    pub digest: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceDecision {
    /// No seed found: keep the current generation untouched.
    NoSeed,
    /// No identity yet: write generation 1.
    FirstBoot,
    /// Same instance-id: change nothing, regenerate nothing.
    Same,
    /// A new instance-id. `moved` is set when the product_uuid changed too (a Proxmox
    /// clone gets a new instance-id because its MAC changed): the clone policy applies
    /// to machine-id and host keys.
    NewInstance { moved: bool },
    /// The product_uuid changed under an unchanged seed.
    Clone,
}

pub fn decide(
    current: Option<&Manifest>,
    seed: Option<SeedSummary<'_>>,
    product_uuid: Option<&str>,
) -> InstanceDecision {
    let Some(seed) = seed else {
        return InstanceDecision::NoSeed;
    };
    let Some(current) = current else {
        return InstanceDecision::FirstBoot;
    };
    let moved = match (current.product_uuid.as_deref(), product_uuid) {
        (Some(old), Some(new)) => !old.eq_ignore_ascii_case(new),
        _ => false,
    };
    if current.instance_id != seed.instance_id {
        return InstanceDecision::NewInstance { moved };
    }
    if moved && current.seed_digest == seed.digest {
        return InstanceDecision::Clone;
    }
    InstanceDecision::Same
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest agent passes its policy to `nixseed-agent request` by name.
    #[test]
    fn a_clone_policy_reads_back_from_its_name() {
        for p in ClonePolicy::ALL {
            assert_eq!(p.name().parse::<ClonePolicy>(), Ok(p));
        }
        assert!("Adopt".parse::<ClonePolicy>().is_err());
    }

    fn manifest(iid: &str, uuid: &str, digest: &str) -> Manifest {
        Manifest {
            generation: 1,
            instance_id: iid.into(),
            source: "nocloud:test".into(),
            product_uuid: Some(uuid.into()),
            seed_digest: digest.into(),
            files: Default::default(),
            seed_generation: None,
        }
    }

    fn s<'a>(iid: &'a str, digest: &'a str) -> Option<SeedSummary<'a>> {
        Some(SeedSummary {
            instance_id: iid,
            digest,
        })
    }

    #[test]
    fn decisions() {
        let m = manifest("a", "U1", "d1");
        assert_eq!(decide(Some(&m), None, Some("U1")), InstanceDecision::NoSeed);
        assert_eq!(
            decide(None, s("a", "d1"), Some("U1")),
            InstanceDecision::FirstBoot
        );
        assert_eq!(
            decide(Some(&m), s("a", "d1"), Some("u1")),
            InstanceDecision::Same
        );
        assert_eq!(
            decide(Some(&m), s("b", "d2"), Some("U1")),
            InstanceDecision::NewInstance { moved: false }
        );
        assert_eq!(
            decide(Some(&m), s("b", "d2"), Some("U2")),
            InstanceDecision::NewInstance { moved: true }
        );
        assert_eq!(
            decide(Some(&m), s("a", "d1"), Some("U2")),
            InstanceDecision::Clone
        );
        // Same instance-id but the seed changed on a new VM: not a clone, treated as same.
        assert_eq!(
            decide(Some(&m), s("a", "d9"), Some("U2")),
            InstanceDecision::Same
        );
    }
}
