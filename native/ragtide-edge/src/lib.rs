//! ragtide's binding of the embedded Qdrant engine (the `qdrant-edge` crate, the engine inside the
//! `qdrant-edge-py` wheel, at the same version and on-disk format).
//!
//! Why not that wheel: it converts every payload value from Python objects field by field (trying bool,
//! then the numbers, then str, with a Python exception per miss) and holds the GIL through the whole
//! `update`. Here a batch crosses as one NumPy array of vectors and one JSON array of payloads; the JSON
//! parse, the write-ahead log and the segment writes all run with the GIL released, so the Python side
//! (chunking the next batch, search) keeps running on the other core.
//!
//! The surface is what `ragtide.embedder.index.edge.EdgeIndex` needs and nothing more. Filters and payloads
//! are Qdrant's REST JSON; results come back as (id, payload JSON) tuples.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use numpy::{PyReadonlyArray1, PyReadonlyArray2};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qdrant_edge::external::serde_json;
use qdrant_edge::{
    CountRequest, CreateIndex, EdgeConfig, EdgeShard, FieldIndexOperations, Filter, JsonPath, NamedQuery,
    OperationError, Payload, PayloadFieldSchema, PayloadOps, PointId, PointInsertOperations,
    PointOperations, PointStructPersisted, QueryEnum, ScrollRequest, SearchRequest, SetPayloadOp,
    UpdateOperation, VectorStructPersisted, WithPayloadInterface, WithVector,
};

create_exception!(ragtide_edge._native, EdgeError, PyException, "An error of the embedded Qdrant engine.");

fn engine_error(err: OperationError) -> PyErr {
    EdgeError::new_err(err.to_string())
}

fn json_error(what: &str, err: serde_json::Error) -> PyErr {
    PyValueError::new_err(format!("{what}: {err}"))
}

fn point_id(id: &str) -> PyResult<PointId> {
    id.parse::<PointId>()
        .map_err(|()| PyValueError::new_err(format!("point id {id:?} is neither an unsigned integer nor a UUID")))
}

fn point_ids(ids: &[String]) -> PyResult<Vec<PointId>> {
    ids.iter().map(|id| point_id(id)).collect()
}

fn filter(json: Option<&str>) -> PyResult<Option<Filter>> {
    json.map(|j| serde_json::from_str(j).map_err(|e| json_error("filter", e)))
        .transpose()
}

fn payload_json(payload: Option<&Payload>) -> String {
    payload
        .map(|p| serde_json::to_string(p).unwrap_or_else(|_| "{}".to_string()))
        .unwrap_or_else(|| "{}".to_string())
}

/// One shard directory, open. Thread-safe: reads and writes may come from any thread; `close` waits for the
/// calls in flight.
#[pyclass(frozen, module = "ragtide_edge._native")]
struct Shard {
    path: PathBuf,
    inner: RwLock<Option<Arc<EdgeShard>>>,
}

impl Shard {
    fn open(&self) -> PyResult<Arc<EdgeShard>> {
        self.inner
            .read()
            .map_err(|_| PyRuntimeError::new_err("shard lock poisoned"))?
            .clone()
            .ok_or_else(|| PyRuntimeError::new_err(format!("shard at {} is closed", self.path.display())))
    }

    fn update(&self, py: Python<'_>, operation: UpdateOperation) -> PyResult<()> {
        let shard = self.open()?;
        py.allow_threads(move || shard.update(operation))
            .map_err(engine_error)
    }

    fn wrap(path: PathBuf, shard: EdgeShard) -> Self {
        Shard {
            path,
            inner: RwLock::new(Some(Arc::new(shard))),
        }
    }
}

#[pymethods]
impl Shard {
    /// A new shard at `path` from an `EdgeConfig` in JSON (e.g. `{"vectors": {"": {"size": 384, "distance":
    /// "Cosine"}}}`).
    #[staticmethod]
    fn create(py: Python<'_>, path: PathBuf, config: &str) -> PyResult<Self> {
        let config: EdgeConfig = serde_json::from_str(config).map_err(|e| json_error("config", e))?;
        let at = path.clone();
        let shard = py
            .allow_threads(move || EdgeShard::new(&at, config))
            .map_err(engine_error)?;
        Ok(Self::wrap(path, shard))
    }

    /// The shard at `path`, with its write-ahead log replayed.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let at = path.clone();
        let shard = py
            .allow_threads(move || EdgeShard::load(&at, None))
            .map_err(engine_error)?;
        Ok(Self::wrap(path, shard))
    }

    /// Index a payload field; `schema` is Qdrant's JSON (`"keyword"`, `{"type": "keyword", "is_tenant": true}`).
    fn create_field_index(&self, py: Python<'_>, field: &str, schema: &str) -> PyResult<()> {
        let schema: PayloadFieldSchema = serde_json::from_str(schema).map_err(|e| json_error("field schema", e))?;
        let field_name = field
            .parse::<JsonPath>()
            .map_err(|()| PyValueError::new_err(format!("{field:?} is not a payload path")))?;
        self.update(
            py,
            UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
                field_name,
                field_schema: Some(schema),
            })),
        )
    }

    /// Insert or replace points: `vectors` has one float32 row per id; `payloads` is a JSON array with one
    /// object per id. Parsed and written with the GIL released.
    fn upsert(
        &self,
        py: Python<'_>,
        ids: Vec<String>,
        vectors: PyReadonlyArray2<'_, f32>,
        payloads: &[u8],
    ) -> PyResult<()> {
        let array = vectors.as_array();
        if array.nrows() != ids.len() {
            return Err(PyValueError::new_err(format!(
                "{} ids but {} vectors",
                ids.len(),
                array.nrows()
            )));
        }
        let ids = point_ids(&ids)?;
        let rows: Vec<Vec<f32>> = array.outer_iter().map(|row| row.to_vec()).collect();
        let payloads = payloads.to_vec();
        let shard = self.open()?;
        py.allow_threads(move || -> PyResult<()> {
            let payloads: Vec<Payload> =
                serde_json::from_slice(&payloads).map_err(|e| json_error("payloads", e))?;
            if payloads.len() != ids.len() {
                return Err(PyValueError::new_err(format!(
                    "{} ids but {} payloads",
                    ids.len(),
                    payloads.len()
                )));
            }
            let points = ids
                .into_iter()
                .zip(rows)
                .zip(payloads)
                .map(|((id, vector), payload)| PointStructPersisted {
                    id,
                    vector: VectorStructPersisted::Single(vector),
                    payload: Some(payload),
                })
                .collect();
            shard
                .update(UpdateOperation::PointOperation(PointOperations::UpsertPoints(
                    PointInsertOperations::PointsList(points),
                )))
                .map_err(engine_error)
        })
    }

    /// Set these payload fields (a JSON object) on existing points.
    fn set_payload(&self, py: Python<'_>, ids: Vec<String>, payload: &str) -> PyResult<()> {
        let payload: Payload = serde_json::from_str(payload).map_err(|e| json_error("payload", e))?;
        let points = point_ids(&ids)?;
        self.update(
            py,
            UpdateOperation::PayloadOperation(PayloadOps::SetPayload(SetPayloadOp {
                payload,
                points: Some(points),
                filter: None,
                key: None,
            })),
        )
    }

    /// Delete points by id.
    fn delete(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<()> {
        let points = point_ids(&ids)?;
        self.update(
            py,
            UpdateOperation::PointOperation(PointOperations::DeletePoints { ids: points }),
        )
    }

    /// Delete every point matching the filter (Qdrant's JSON).
    fn delete_where(&self, py: Python<'_>, filter_json: &str) -> PyResult<()> {
        let flt = filter(Some(filter_json))?.expect("a filter");
        self.update(
            py,
            UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(flt)),
        )
    }

    /// One page of points matching the filter, from `offset` (a point id) on: ([(id, payload JSON)], next offset).
    #[pyo3(signature = (filter_json, offset, limit))]
    fn scroll(
        &self,
        py: Python<'_>,
        filter_json: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> PyResult<(Vec<(String, String)>, Option<String>)> {
        let mut request = ScrollRequest::new();
        request.filter = filter(filter_json)?;
        request.offset = offset.as_deref().map(point_id).transpose()?;
        request.limit = Some(limit);
        request.with_payload = Some(WithPayloadInterface::Bool(true));
        request.with_vector = WithVector::Bool(false);
        let shard = self.open()?;
        py.allow_threads(move || {
            let (records, next) = shard.scroll(request).map_err(engine_error)?;
            let page = records
                .iter()
                .map(|r| (r.id.to_string(), payload_json(r.payload.as_ref())))
                .collect();
            Ok((page, next.map(|id| id.to_string())))
        })
    }

    /// The `limit` nearest points to `vector`: [(id, score, payload JSON)].
    #[pyo3(signature = (vector, limit, filter_json=None))]
    fn search(
        &self,
        py: Python<'_>,
        vector: PyReadonlyArray1<'_, f32>,
        limit: usize,
        filter_json: Option<&str>,
    ) -> PyResult<Vec<(String, f32, String)>> {
        let query = QueryEnum::Nearest(NamedQuery::default_dense(vector.as_array().to_vec()));
        let mut request = SearchRequest::new(query, limit);
        request.filter = filter(filter_json)?;
        request.with_payload = Some(WithPayloadInterface::Bool(true));
        request.with_vector = Some(WithVector::Bool(false));
        let shard = self.open()?;
        py.allow_threads(move || {
            let hits = shard.search(request).map_err(engine_error)?;
            Ok(hits
                .iter()
                .map(|p| (p.id.to_string(), p.score, payload_json(p.payload.as_ref())))
                .collect())
        })
    }

    /// The exact number of points matching the filter.
    #[pyo3(signature = (filter_json=None))]
    fn count(&self, py: Python<'_>, filter_json: Option<&str>) -> PyResult<usize> {
        let mut request = CountRequest::new();
        request.filter = filter(filter_json)?;
        request.exact = true;
        let shard = self.open()?;
        py.allow_threads(move || shard.count(request)).map_err(engine_error)
    }

    /// `points_count`, `indexed_vectors_count`, `segments_count` and `payload_schema` (the indexed fields).
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shard = self.open()?;
        let info = py.allow_threads(move || shard.info()).map_err(engine_error)?;
        let mut fields: Vec<String> = info.payload_schema.keys().map(|k| k.to_string()).collect();
        fields.sort();
        let out = PyDict::new(py);
        out.set_item("points_count", info.points_count)?;
        out.set_item("indexed_vectors_count", info.indexed_vectors_count)?;
        out.set_item("segments_count", info.segments_count)?;
        out.set_item("payload_schema", fields)?;
        Ok(out)
    }

    /// Merge segments and build the HNSW index; whether anything was done.
    fn optimize(&self, py: Python<'_>) -> PyResult<bool> {
        let shard = self.open()?;
        py.allow_threads(move || shard.optimize()).map_err(engine_error)
    }

    /// Persist the WAL and the segments.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let shard = self.open()?;
        py.allow_threads(move || shard.flush()).map_err(engine_error)
    }

    /// Flush and release the shard (its files stay), once the calls in flight on other threads have returned
    /// (each holds a reference to it). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self
            .inner
            .write()
            .map_err(|_| PyRuntimeError::new_err("shard lock poisoned"))?
            .take();
        if let Some(shard) = taken {
            py.allow_threads(move || -> PyResult<()> {
                while Arc::strong_count(&shard) > 1 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                shard.flush().map_err(engine_error)?;
                drop(shard); // the engine's files are released here, before close returns
                Ok(())
            })?;
        }
        Ok(())
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Shard>()?;
    m.add("EdgeError", m.py().get_type::<EdgeError>())?;
    Ok(())
}
