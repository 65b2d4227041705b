//! A realistic OpenTelemetry Collector effective config of a requested size.

/// The base config every agent reports; padded with attribute processors up to the size.
const BASE: &str = "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 0.0.0.0:4317
      http:
        endpoint: 0.0.0.0:4318
  hostmetrics:
    collection_interval: 30s
    scrapers:
      cpu: {}
      memory: {}
      disk: {}
      filesystem: {}
      network: {}
exporters:
  otlphttp:
    endpoint: https://otlp.observability.example.internal:4318
    compression: gzip
    retry_on_failure:
      enabled: true
      max_elapsed_time: 300s
service:
  telemetry:
    metrics:
      level: normal
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, batch]
      exporters: [otlphttp]
    metrics:
      receivers: [otlp, hostmetrics]
      processors: [memory_limiter, batch]
      exporters: [otlphttp]
processors:
  memory_limiter:
    check_interval: 1s
    limit_percentage: 80
    spike_limit_percentage: 20
  batch:
    send_batch_size: 8192
    timeout: 200ms
";

/// A YAML config of exactly `bytes` bytes (at least the base config's size, which is ~1 KiB),
/// with `marker` in a comment so distinct pushes hash differently.
pub fn effective_config_with(bytes: usize, marker: &str) -> String {
    let mut s = format!("# {marker}\n{BASE}");
    let mut i = 0;
    while s.len() < bytes {
        s.push_str(&format!(
            "  attributes/enrich{i}:\n    actions:\n      - key: deployment.tier{i}\n        value: backend-{i}\n        action: upsert\n"
        ));
        i += 1;
    }
    // Trim the padding to the exact size with a comment line (keeps the YAML valid).
    if s.len() > bytes && bytes > BASE.len() + 64 {
        let cut = s[..bytes.saturating_sub(1)]
            .rfind('\n')
            .map_or(0, |p| p + 1);
        s.truncate(cut);
        while s.len() + 1 < bytes {
            s.push(if s.ends_with('\n') { '#' } else { 'x' });
        }
        s.push('\n');
    }
    s
}

pub fn effective_config(bytes: usize) -> String {
    effective_config_with(bytes, "local config")
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_exact_above_the_base() {
        for n in [1500, 2048, 4096, 10_000] {
            assert_eq!(super::effective_config(n).len(), n);
        }
        assert!(super::effective_config(10).len() > 900);
    }
}
