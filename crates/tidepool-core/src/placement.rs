//! The placement file: which models each accelerator of a fleet serves, as `tidepool plan`
//! writes it and `tidepool serve --placement` / `tidepool worker --placement` (or
//! `[pool] placement_file`) read it. TOML, versioned ([`PLACEMENT_VERSION`]); a model may be
//! listed on several accelerators (its instances). Reading checks the file on its own (version,
//! accelerator indices, duplicates, slugs) and against the models a server knows, each problem
//! with a stable code ([`CoreError::PlacementInvalid`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Config, CoreError, ModelId};

/// The placement file format this build writes and reads.
pub const PLACEMENT_VERSION: u32 = 1;
/// Accelerators in one placement file.
pub const PLACEMENT_ACCELERATORS_MAX: u32 = 4096;
/// Bytes of one placement file.
pub const PLACEMENT_BYTES_MAX: u64 = 16 << 20;

/// One placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementFile {
    /// [`PLACEMENT_VERSION`].
    pub version: u32,
    /// What produced it, for people (e.g. `tidepool plan: token on 12 h100 accelerators`).
    #[serde(default)]
    pub source: String,
    /// One entry per accelerator, indices 0, 1, … in order.
    pub accelerator: Vec<AcceleratorPlacement>,
}

/// The models one accelerator serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceleratorPlacement {
    pub index: u32,
    pub models: Vec<String>,
}

fn invalid(code: &'static str, reason: String) -> CoreError {
    CoreError::PlacementInvalid { code, reason }
}

impl PlacementFile {
    /// Reads and checks a placement file (not yet against a server's models: [`Self::check_models`]).
    pub fn load(path: &Path) -> Result<Self, CoreError> {
        let bytes = std::fs::metadata(path)
            .map_err(|source| CoreError::ConfigRead {
                path: path.to_owned(),
                source,
            })?
            .len();
        if bytes > PLACEMENT_BYTES_MAX {
            return Err(invalid(
                "placement_too_large",
                format!(
                    "{}: {bytes} bytes, at most {PLACEMENT_BYTES_MAX}",
                    path.display()
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks a placement file's text.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        let file: Self = toml::from_str(text)
            .map_err(|e| invalid("placement_parse", e.message().trim().to_owned()))?;
        file.check()?;
        Ok(file)
    }

    /// The file as TOML, in the format [`Self::parse`] reads.
    pub fn to_toml(&self) -> Result<String, CoreError> {
        toml::to_string_pretty(self).map_err(|e| invalid("placement_write", e.to_string()))
    }

    /// The file on its own: version, accelerators 0, 1, … in order, slugs, no model twice on
    /// one accelerator.
    pub fn check(&self) -> Result<(), CoreError> {
        if self.version != PLACEMENT_VERSION {
            return Err(invalid(
                "placement_version",
                format!(
                    "version {} (this build reads version {PLACEMENT_VERSION})",
                    self.version
                ),
            ));
        }
        let len = u32::try_from(self.accelerator.len()).unwrap_or(u32::MAX);
        if len == 0 || len > PLACEMENT_ACCELERATORS_MAX {
            return Err(invalid(
                "placement_accelerators",
                format!("{len} accelerators (1..={PLACEMENT_ACCELERATORS_MAX})"),
            ));
        }
        for (i, acc) in self.accelerator.iter().enumerate() {
            if usize::try_from(acc.index).ok() != Some(i) {
                return Err(invalid(
                    "placement_accelerators",
                    format!(
                        "accelerator {} listed at position {i}: indices go 0, 1, … in order",
                        acc.index
                    ),
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for model in &acc.models {
                ModelId::new(model.clone())
                    .map_err(|e| invalid("placement_model_id", format!("accelerator {i}: {e}")))?;
                if !seen.insert(model) {
                    return Err(invalid(
                        "placement_duplicate",
                        format!("accelerator {i} lists `{model}` twice"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every model the file places must be one of `known` (the server's configured models).
    pub fn check_models<'a>(
        &self,
        known: impl IntoIterator<Item = &'a ModelId>,
    ) -> Result<(), CoreError> {
        let known: std::collections::BTreeSet<&str> =
            known.into_iter().map(ModelId::as_str).collect();
        for acc in &self.accelerator {
            if let Some(unknown) = acc.models.iter().find(|m| !known.contains(m.as_str())) {
                return Err(invalid(
                    "placement_unknown_model",
                    format!(
                        "accelerator {} places `{unknown}`, which is not a configured model",
                        acc.index
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The models accelerator `index` serves.
    pub fn models_of(&self, index: u32) -> Result<&[String], CoreError> {
        self.accelerator
            .get(usize::try_from(index).unwrap_or(usize::MAX))
            .map(|a| a.models.as_slice())
            .ok_or_else(|| {
                invalid(
                    "placement_accelerator",
                    format!(
                        "accelerator {index}: the placement has {} (0..={})",
                        self.accelerator.len(),
                        self.accelerator.len().saturating_sub(1)
                    ),
                )
            })
    }

    /// The accelerators holding an instance of `model`, ascending.
    pub fn instances(&self, model: &str) -> Vec<u32> {
        self.accelerator
            .iter()
            .filter(|a| a.models.iter().any(|m| m == model))
            .map(|a| a.index)
            .collect()
    }
}

impl PlacementFile {
    /// What one server process does with the plan: it serves accelerator `accelerator`'s
    /// models. Checked against `config`'s models first (every placed model must be configured),
    /// then `config.models` keeps the models placed on `accelerator` and those the plan does not
    /// mention at all (embedding or remote models, which the planner does not place); models
    /// placed only on other accelerators are left to the processes serving those. An
    /// accelerator holding exactly one model (a `dedicated` instance) pins it, so it stays
    /// resident; with several the pool time-shares them by its policy, as the plan simulated,
    /// and their `pin` stays as configured. Returns the models placed here.
    pub fn apply(&self, config: &mut Config, accelerator: u32) -> Result<Vec<ModelId>, CoreError> {
        self.check_models(config.models.iter().map(|m| &m.id))?;
        let here: std::collections::BTreeSet<&str> = self
            .models_of(accelerator)?
            .iter()
            .map(String::as_str)
            .collect();
        let placed: std::collections::BTreeSet<&str> = self
            .accelerator
            .iter()
            .flat_map(|a| a.models.iter().map(String::as_str))
            .collect();
        config
            .models
            .retain(|m| here.contains(m.id.as_str()) || !placed.contains(m.id.as_str()));
        let pin_alone = here.len() == 1;
        let mut served = Vec::new();
        for model in &mut config.models {
            if here.contains(model.id.as_str()) {
                model.pin |= pin_alone;
                served.push(model.id.clone());
            }
        }
        config.validate()?;
        Ok(served)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
version = 1
source = "test"

[[accelerator]]
index = 0
models = ["hot", "tail-a"]

[[accelerator]]
index = 1
models = ["hot", "tail-b"]
"#;

    fn code(error: CoreError) -> &'static str {
        match error {
            CoreError::PlacementInvalid { code, .. } => code,
            other => panic!("not a placement error: {other}"),
        }
    }

    #[test]
    fn a_placement_round_trips_and_answers_per_accelerator_and_model() {
        let file = PlacementFile::parse(FILE).unwrap();
        assert_eq!(file.models_of(1).unwrap(), ["hot", "tail-b"]);
        assert_eq!(file.instances("hot"), [0, 1]);
        assert_eq!(
            PlacementFile::parse(&file.to_toml().unwrap()).unwrap(),
            file
        );
        assert_eq!(
            code(file.models_of(2).unwrap_err()),
            "placement_accelerator"
        );
        let known: Vec<ModelId> = ["hot", "tail-a", "tail-b"]
            .into_iter()
            .map(|m| ModelId::new(m).unwrap())
            .collect();
        file.check_models(&known).unwrap();
        let error = file.check_models(&known[..2]).unwrap_err();
        assert!(error.to_string().contains("tail-b"), "{error}");
        assert_eq!(code(error), "placement_unknown_model");
    }

    /// A process takes its accelerator's models; models the plan does not place stay; a model
    /// alone on its accelerator is pinned; an unknown model is a clear error, not a panic.
    #[test]
    fn a_process_serves_its_accelerators_models() {
        let mut models = String::new();
        for id in ["hot", "tail-a", "tail-b", "embed"] {
            models.push_str("[[models]]\nid = \"");
            models.push_str(id);
            models.push_str("\"\nkind = \"chat\"\nfile = \"x.gguf\"\n");
        }
        let config = Config::parse(&models, Path::new("t.toml")).unwrap();
        let file = PlacementFile::parse(FILE).unwrap();
        let mut first = config.clone();
        let served = file.apply(&mut first, 1).unwrap();
        assert_eq!(
            served.iter().map(ModelId::as_str).collect::<Vec<_>>(),
            ["hot", "tail-b"]
        );
        let kept: Vec<&str> = first.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(kept, ["hot", "tail-b", "embed"]);
        assert!(
            first.models.iter().all(|m| !m.pin),
            "shared accelerators pin nothing"
        );
        let alone =
            PlacementFile::parse(&FILE.replace("[\"hot\", \"tail-a\"]", "[\"tail-a\"]")).unwrap();
        let mut second = config.clone();
        alone.apply(&mut second, 0).unwrap();
        assert!(
            second
                .models
                .iter()
                .any(|m| m.id.as_str() == "tail-a" && m.pin)
        );
        let mut third = config.clone();
        assert_eq!(
            code(file.apply(&mut third, 2).unwrap_err()),
            "placement_accelerator"
        );
        let unknown = PlacementFile::parse(&FILE.replace("tail-b", "not-configured")).unwrap();
        let mut fourth = config;
        assert_eq!(
            code(unknown.apply(&mut fourth, 0).unwrap_err()),
            "placement_unknown_model"
        );
    }

    #[test]
    fn bad_files_are_refused_with_stable_codes() {
        for (text, want) in [
            (
                FILE.replace("version = 1", "version = 2"),
                "placement_version",
            ),
            (
                FILE.replace("index = 1", "index = 3"),
                "placement_accelerators",
            ),
            (FILE.replace("\"tail-b\"", "\"hot\""), "placement_duplicate"),
            (FILE.replace("tail-b", "Tail B"), "placement_model_id"),
            (FILE.replace("models =", "modelz ="), "placement_parse"),
            (
                "version = 1\naccelerator = []\n".to_owned(),
                "placement_accelerators",
            ),
        ] {
            assert_eq!(
                code(PlacementFile::parse(&text).unwrap_err()),
                want,
                "{text}"
            );
        }
    }
}
