//! The L2 tier as a `MetricSet`: unique names, labels, and values from a running tier.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kvtier_core::l1::{L1Config, L1Manager};
use kvtier_core::metrics::{HistogramSnapshot, Labels, MetricDesc, MetricSet, MetricVisitor};
use kvtier_storage::config::MockConfig;
use kvtier_storage::testsuite::{key, pattern, test_segment, unique_model};
use kvtier_storage::{AdapterConfig, L2Tier, L2TierConfig};

/// Records every sample as `(exposed name, sorted labels) -> value`.
#[derive(Default)]
struct Collect {
    names: HashMap<&'static str, String>,
    samples: HashMap<(String, Vec<(String, String)>), f64>,
    duplicates: Vec<String>,
}

impl Collect {
    fn add(&mut self, d: &'static MetricDesc, labels: Labels<'_>, v: f64) {
        let exposed = d.exposed_name();
        if let Some(prev) = self.names.insert(d.name, exposed.clone()) {
            assert_eq!(prev, exposed);
        }
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.sort();
        if self
            .samples
            .insert((exposed.clone(), l.clone()), v)
            .is_some()
        {
            self.duplicates.push(format!("{exposed}{l:?}"));
        }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.sort();
        self.samples.get(&(name.to_owned(), l)).copied()
    }
}

impl MetricVisitor for Collect {
    fn counter(&mut self, d: &'static MetricDesc, labels: Labels<'_>, v: u64) {
        self.add(d, labels, v as f64);
    }
    fn gauge(&mut self, d: &'static MetricDesc, labels: Labels<'_>, v: f64) {
        self.add(d, labels, v);
    }
    fn histogram(&mut self, d: &'static MetricDesc, labels: Labels<'_>, h: &HistogramSnapshot) {
        self.add(d, labels, h.count as f64);
    }
}

#[test]
fn descriptors_are_listed_without_a_tier_and_unique() {
    let all = kvtier_storage::metrics::descriptors();
    let names: HashSet<String> = all.iter().map(MetricDesc::exposed_name).collect();
    assert_eq!(names.len(), all.len(), "duplicate exposed names");
    assert!(names.contains("kvtier_l2_adapter_op_duration_seconds"));
    assert!(names.contains("kvtier_l2_store_controller_submitted_keys_total"));
}

#[test]
fn a_tier_with_a_mock_adapter_visits_every_metric_with_values() {
    let l1_bytes = 16 << 20;
    let l1 = Arc::new(L1Manager::new(L1Config::with_capacity(l1_bytes)));
    let seg = test_segment(l1_bytes);
    let cfg = L2TierConfig {
        adapters: vec![AdapterConfig::Mock(MockConfig {
            max_size_gb: 1.0,
            mock_bandwidth_gb: 100.0,
            eviction: None,
        })],
        ..L2TierConfig::default()
    };
    let tier = L2Tier::start(cfg, Arc::clone(&l1), Arc::clone(&seg)).expect("tier starts");
    let model = unique_model();
    let k = key(&model, 7);
    let data = pattern(7, 4096);
    let t = l1.reserve_write(&[(k.clone(), data.len() as u64)], false);
    let t = t[0].expect("room in L1");
    seg.copy_in(t.alloc.offset as usize, &data)
        .expect("in bounds");
    assert!(l1.finish_write(&[t])[0].is_ok());
    assert!(tier.store().submit(vec![k.clone()]));
    assert!(tier.wait_store_idle(Duration::from_secs(10)));
    let found = tier.block_on(tier.adapters()[0].lookup_and_pin(std::slice::from_ref(&k)));
    assert_eq!(found.expect("lookup"), vec![Some(4096)]);

    let mut c = Collect::default();
    tier.visit(&mut c);
    assert!(
        c.duplicates.is_empty(),
        "samples visited twice: {:?}",
        c.duplicates
    );
    let catalog: HashSet<&str> = tier.descriptors().iter().map(|d| d.name).collect();
    for name in c.names.keys() {
        assert!(
            catalog.contains(name),
            "{name} visited but not in descriptors()"
        );
    }
    // Only the valkey adapter's own sets (topology, per-node) are not visited by a mock.
    let common: HashSet<&str> = catalog
        .iter()
        .copied()
        .filter(|n| !n.starts_with("kvtier_l2_valkey_"))
        .collect();
    assert_eq!(
        c.names.len(),
        common.len(),
        "every descriptor but valkey's is visited by a tier with one mock adapter"
    );
    let a = ("adapter", "0_mock");
    assert_eq!(
        c.get("kvtier_l2_store_controller_submitted_keys_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        c.get("kvtier_l2_store_controller_adapter_stored_keys_total", &[a]),
        Some(1.0)
    );
    assert_eq!(
        c.get("kvtier_l2_adapter_op_objects_total", &[a, ("op", "store")]),
        Some(1.0)
    );
    assert_eq!(
        c.get(
            "kvtier_l2_adapter_op_payload_bytes_total",
            &[a, ("op", "store")]
        ),
        Some(4096.0)
    );
    assert_eq!(
        c.get(
            "kvtier_l2_adapter_op_duration_seconds",
            &[a, ("op", "store")]
        ),
        Some(1.0)
    );
    assert_eq!(
        c.get("kvtier_l2_adapter_op_objects_total", &[a, ("op", "lookup")]),
        Some(1.0)
    );
    assert_eq!(c.get("kvtier_l2_adapter_stored_objects", &[a]), Some(1.0));
    assert_eq!(c.get("kvtier_l2_adapter_locked_keys", &[a]), Some(1.0));
    assert_eq!(c.get("kvtier_l2_adapter_connected", &[a]), Some(1.0));
    assert_eq!(c.get("kvtier_l2_adapter_size_bytes", &[a]), Some(4096.0));
    assert_eq!(c.get("kvtier_l2_adapter_errors_total", &[a]), Some(0.0));

    // The status tree shows the same values under the catalog's status keys.
    let (store, _, adapters) = tier.status_nodes();
    let store = store.to_value();
    assert_eq!(store["submitted_keys_total"], 1, "{store}");
    assert_eq!(store["adapters"][0]["stored_keys_total"], 1, "{store}");
    let ad = adapters[0].to_value();
    assert_eq!(ad["ops"]["store"]["bytes_total"], 4096, "{ad}");
    assert!(ad["ops"]["delete"]["latency_p50_seconds"].is_null(), "{ad}");
    assert!(ad["ops"]["store"]["latency_p50_seconds"].as_f64() > Some(0.0));
    tier.block_on(tier.adapters()[0].unpin(std::slice::from_ref(&k)));
    tier.shutdown();
}
