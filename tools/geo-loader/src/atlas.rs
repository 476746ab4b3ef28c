//! Natural Earth's country polygons as world-atlas ships them (npm `world-atlas` 2, TopoJSON, public domain
//! data): decoded with the `topojson` crate (arcs, quantization), each country as WKT for geo-search.

use anyhow::{Context, bail};
use geo_types::Geometry;
use topojson::TopoJson;
use wkt::ToWkt;

/// One country as geo-search stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct Area {
    /// Natural Earth's `name` (e.g. `France`).
    pub name: String,
    /// Its polygon or multipolygon, WKT, longitude first, WGS 84.
    pub wkt: String,
    /// Vertices in it (geo-search takes at most 10,000).
    pub vertices: usize,
}

/// The countries of a world-atlas `countries-*.json` file (object `countries`), in file order; features
/// without a name or a polygon are left out.
///
/// # Errors
/// Not TopoJSON, or no `countries` object.
pub fn countries(topojson: &str) -> anyhow::Result<Vec<Area>> {
    let TopoJson::Topology(topology) = topojson.parse::<TopoJson>().context("not TopoJSON")? else {
        bail!("not a TopoJSON Topology");
    };
    let features = topojson::to_geojson(&topology, "countries")
        .context("no `countries` object (a world-atlas countries-*.json file?)")?;
    let mut areas = Vec::new();
    for feature in features.features {
        let name = feature
            .properties
            .as_ref()
            .and_then(|p| p.get("name"))
            .and_then(|n| n.as_str())
            .map(str::trim)
            .unwrap_or_default()
            .to_owned();
        let Some(geometry) = feature.geometry else {
            continue;
        };
        let Ok(mut shape) = Geometry::<f64>::try_from(geometry.value) else {
            continue;
        };
        // Consecutive arcs of a ring share their end points, which the decoder keeps twice.
        match &mut shape {
            Geometry::Polygon(p) => dedup(p),
            Geometry::MultiPolygon(m) => m.0.iter_mut().for_each(dedup),
            _ => {}
        }
        if let Geometry::MultiPolygon(m) = &mut shape {
            m.0.retain(|p| p.exterior().0.len() >= 4);
        }
        let vertices = match &shape {
            Geometry::Polygon(p) if p.exterior().0.len() >= 4 => rings(p),
            Geometry::MultiPolygon(m) if !m.0.is_empty() => m.0.iter().map(rings).sum(),
            _ => continue,
        };
        if name.is_empty() {
            continue;
        }
        areas.push(Area {
            name,
            wkt: shape.wkt_string(),
            vertices,
        });
    }
    Ok(areas)
}

/// Drops repeated consecutive vertices of every ring of `p`, then the holes that no longer enclose anything
/// (a closed ring needs four vertices; PostGIS refuses fewer).
fn dedup(p: &mut geo_types::Polygon<f64>) {
    let empty = geo_types::Polygon::new(geo_types::LineString::new(Vec::new()), Vec::new());
    let (mut exterior, interiors) = std::mem::replace(p, empty).into_inner();
    exterior.0.dedup();
    let interiors = interiors
        .into_iter()
        .map(|mut ring| {
            ring.0.dedup();
            ring
        })
        .filter(|ring| ring.0.len() >= 4)
        .collect();
    *p = geo_types::Polygon::new(exterior, interiors);
}

fn rings(p: &geo_types::Polygon<f64>) -> usize {
    p.exterior().0.len() + p.interiors().iter().map(|r| r.0.len()).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two countries sharing an arc (one reversed, `~0`), quantized as world-atlas files are.
    const SHARED_BORDER: &str = r#"{
      "type": "Topology",
      "transform": {"scale": [0.001, 0.001], "translate": [0, 0]},
      "objects": {"countries": {"type": "GeometryCollection", "geometries": [
        {"type": "Polygon", "arcs": [[0, 1]], "id": "001", "properties": {"name": "West"}},
        {"type": "Polygon", "arcs": [[-1, 2]], "id": "002", "properties": {"name": "East"}},
        {"type": "Polygon", "arcs": [[-1, 2]], "id": "003", "properties": {}}
      ]}},
      "arcs": [
        [[1000, 0], [0, 1000]],
        [[1000, 1000], [-1000, 0], [0, -1000], [1000, 0]],
        [[1000, 0], [1000, 0], [0, 1000], [-1000, 0]]
      ]
    }"#;

    #[test]
    fn countries_are_decoded_with_their_shared_borders_and_quantization() {
        let areas = countries(SHARED_BORDER).unwrap();
        let names: Vec<_> = areas.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["West", "East"], "the one without a name left out");
        assert_eq!(areas[0].wkt, "POLYGON((1 0,1 1,0 1,0 0,1 0))");
        assert_eq!(areas[1].wkt, "POLYGON((1 1,1 0,2 0,2 1,1 1))");
        assert_eq!(areas[0].vertices, 5);
    }

    #[test]
    fn other_files_are_refused_with_a_reason() {
        let err = countries(r#"{"type": "FeatureCollection", "features": []}"#).unwrap_err();
        assert!(format!("{err:#}").contains("not TopoJSON"), "{err:#}");
        let err = countries(&SHARED_BORDER.replace("countries", "land")).unwrap_err();
        assert!(format!("{err:#}").contains("countries"), "{err:#}");
    }
}
