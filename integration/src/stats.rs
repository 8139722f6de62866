//! Figures over a benchmark's runs.

use serde::Serialize;

/// The median of some runs' figures, and their spread.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The median (of the middle two, for an even count), min and max;
    /// `None` for no values.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        let median = if values.len() % 2 == 1 {
            values[middle]
        } else {
            (values[middle - 1] + values[middle]) / 2.0
        };
        Some(Self {
            median,
            min: values[0],
            max: values[values.len() - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_median() {
        let spread = Spread::of(vec![3.0, 1.0, 2.0]).expect("non-empty");
        assert_eq!((spread.median, spread.min, spread.max), (2.0, 1.0, 3.0));
        let even = Spread::of(vec![4.0, 1.0, 2.0, 3.0]).expect("non-empty");
        assert_eq!(even.median, 2.5);
        assert!(Spread::of(Vec::new()).is_none());
    }
}
