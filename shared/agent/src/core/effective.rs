//! The effective config's layout: which files, in which order, of which lengths. The bodies
//! themselves live concatenated in [`AgentStatus::effective_config`](crate::AgentStatus), the
//! one copy of the config; [`ConfigLayout`] splits that text back into the `EffectiveConfig`
//! reported to the server, and records the files of a config the server sent.

use proto::v1::{AgentConfigFile, AgentConfigMap, EffectiveConfig};

/// Content type of the initial (local) effective config.
const INITIAL_CONTENT_TYPE: &str = "text/yaml";

/// One file of the effective config: how to cut its body out of the concatenated text.
#[derive(Debug, Clone)]
struct FileLayout {
    name: String,
    content_type: String,
    len: usize,
}

/// The files of the effective config, in the order their bodies are concatenated.
#[derive(Debug, Clone)]
pub(super) struct ConfigLayout(Vec<FileLayout>);

impl ConfigLayout {
    /// The initial (local) config: one unnamed YAML file of `len` bytes.
    pub(super) fn initial(len: usize) -> Self {
        Self(vec![FileLayout {
            name: String::new(),
            content_type: INITIAL_CONTENT_TYPE.into(),
            len,
        }])
    }

    /// Adopts `map` as the effective config: records its files and returns their bodies
    /// concatenated, the text that goes into the status.
    pub(super) fn adopt(&mut self, map: AgentConfigMap) -> String {
        let mut text = String::new();
        self.0.clear();
        for (name, file) in map.config_map {
            let body = String::from_utf8(file.body)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            self.0.push(FileLayout {
                name,
                content_type: file.content_type,
                len: body.len(),
            });
            if text.is_empty() {
                text = body;
            } else {
                text.push_str(&body);
            }
        }
        text
    }

    /// Rebuilds the config map from `text`, the concatenated bodies.
    pub(super) fn config(&self, text: &str) -> EffectiveConfig {
        let mut pos = 0;
        let config_map = self
            .0
            .iter()
            .map(|f| {
                let body = text.get(pos..pos + f.len).unwrap_or_default();
                pos += f.len;
                (
                    f.name.clone(),
                    AgentConfigFile {
                        body: body.as_bytes().to_vec(),
                        content_type: f.content_type.clone(),
                    },
                )
            })
            .collect();
        EffectiveConfig {
            config_map: Some(AgentConfigMap { config_map }),
        }
    }
}
